"""Test helper: img2dataset-style webdataset shards with real JPEGs of coloured shapes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def sample(index: int, size: int = 48) -> tuple[Image.Image, str, str]:
    """(image, caption, split) for a sample number; deterministic."""
    colour = list(COLOURS)[index % len(COLOURS)]
    shape = SHAPES[(index // len(COLOURS)) % len(SHAPES)]
    rng = np.random.default_rng(index)
    image = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    r = size * (0.15 + 0.15 * rng.random())
    cx, cy = size * (0.3 + 0.4 * rng.random()), size * (0.3 + 0.4 * rng.random())
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    size_word = "small" if r < size * 0.22 else "large"
    split = "heldout" if (colour, shape) == ("yellow", "triangle") else "train"
    return image, f"a {size_word} {colour} {shape}", split


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(directory: Path, shard: int, per_shard: int, size: int = 48,
                corrupt: dict[int, str] | None = None) -> Path:
    """`{shard:05d}.tar` (+ img2dataset's parquet/stats side files, empty stand-ins) with `per_shard`
    samples; `corrupt` maps a sample index in the shard to "image" (bytes that are not an image),
    "caption" (not UTF-8) or "no_image"."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{shard:05d}.tar"
    corrupt = corrupt or {}
    with tarfile.open(path, "w") as tar:
        for i in range(per_shard):
            index = shard * per_shard + i
            key = f"{shard:05d}{i:04d}"
            image, caption, split = sample(index, size)
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=90)
            jpg = buf.getvalue()
            kind = corrupt.get(i)
            if kind == "image":
                jpg = jpg[: len(jpg) // 3]  # a truncated JPEG: the header parses, the data ends early
            text = caption.encode()
            if kind == "caption":
                text = b"\xff\xfe caption \xc3\x28"
            if kind != "no_image":
                _add(tar, f"{key}.jpg", jpg)
            _add(tar, f"{key}.txt", text)
            meta = {"key": key, "status": "success", "caption": caption, "split": split, "width": size, "height": size}
            _add(tar, f"{key}.json", json.dumps(meta).encode())
    (directory / f"{shard:05d}.parquet").write_bytes(b"")  # side files the embed stage must ignore
    (directory / f"{shard:05d}_stats.json").write_text(json.dumps({"count": per_shard}))
    return path


def write_shards(directory: Path, shards: range | list[int], per_shard: int, size: int = 48) -> list[Path]:
    return [write_shard(directory, s, per_shard, size) for s in shards]


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * fraction)])


def expected_rows(directory: Path) -> dict[str, tuple[str, str]]:
    """key -> (caption, split) for the samples of intact shards written by `write_shard`."""
    out = {}
    for path in sorted(Path(directory).glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    out[meta["key"]] = (meta["caption"], meta["split"])
    return out


# --- a session-scoped embedded table shared by test_embed.py and test_dataset.py -----------------
import dataclasses  # noqa: E402
import tarfile as _tarfile  # noqa: E402

import pytest  # noqa: E402

PER_SHARD = 30
CORRUPT = {2: "image", 5: "caption", 7: "no_image"}  # in shard 4
TRUNCATED_SHARD = 5


@dataclasses.dataclass
class Embedded:
    ingest: Path
    out: Path
    counts: dict
    threshold: float
    reference_weights: dict  # the independently seeded open_clip CLIP's state dict
    good: dict  # key -> (caption, split, image bytes) of every sample that should embed


def readable_samples(directory: Path) -> dict[str, tuple[str, str, bytes]]:
    """The samples an embed stage should keep: decodable JPEG, UTF-8 caption, before tar damage."""
    out = {}
    for path in sorted(Path(directory).glob("*.tar")):
        fields: dict[str, dict[str, bytes]] = {}
        try:
            with _tarfile.open(path, "r|") as tar:
                for member in tar:
                    key, ext = member.name.split(".", 1)
                    fields.setdefault(key, {})[ext] = tar.extractfile(member).read()
        except (_tarfile.TarError, OSError):
            fields.pop(max(fields), None) if fields else None  # the sample at the damage point
        for key, f in fields.items():
            if "jpg" not in f or "txt" not in f:
                continue
            try:
                caption = f["txt"].decode("utf-8")
                with Image.open(io.BytesIO(f["jpg"])) as im:
                    im.load()
            except Exception:
                continue
            out[key] = (caption, json.loads(f["json"])["split"], f["jpg"])
    return out


def independent_embeddings(state_dict: dict, arch: dict, samples: list[tuple[str, bytes]]):
    """(z_i, z_t) float32 with open_clip alone: its CLIP class, transform and tokenizer."""
    import open_clip
    import torch

    model = open_clip.CLIP(**arch).eval()
    model.load_state_dict(state_dict)
    size = arch["vision_cfg"]["image_size"]
    transform = open_clip.image_transform(size, is_train=False)
    tokenizer = open_clip.SimpleTokenizer(context_length=arch["text_cfg"]["context_length"])
    images = torch.stack([transform(Image.open(io.BytesIO(b))) for _, b in samples])
    with torch.no_grad():
        z_i = model.encode_image(images, normalize=True)
        z_t = model.encode_text(tokenizer([c for c, _ in samples]), normalize=True)
    return z_i.numpy(), z_t.numpy()


@pytest.fixture(scope="session")
def embedded(ray_local, tmp_path_factory) -> Embedded:
    import torch
    import open_clip

    from models.clip import TINY_CLIP_ARCH
    from tasks.context import StageContext
    from tasks.embed import EmbedConfig, run

    root = tmp_path_factory.mktemp("embedded")
    ingest, out = root / "ingest", root / "embed"
    out.mkdir()
    write_shards(ingest, range(4), PER_SHARD)
    write_shard(ingest, 4, PER_SHARD, corrupt=CORRUPT)
    truncate(write_shard(ingest, TRUNCATED_SHARD, PER_SHARD), 0.55)
    good = readable_samples(ingest)
    # the stage seeds torch with ctx.seed before building a random-init architecture: do the same here
    torch.manual_seed(0)
    weights = {k: v.clone() for k, v in open_clip.CLIP(**TINY_CLIP_ARCH).state_dict().items()}
    z_i, z_t = independent_embeddings(weights, TINY_CLIP_ARCH, [(c, b) for c, _, b in good.values()])
    raw = (z_i * z_t).sum(-1)
    sims = np.sort(raw)
    # filter about a fifth of the rows, but keep some held-out rows; threshold in the widest gap of a
    # window there (robust to round-off)
    heldout_max = max(s for s, (_, split, _) in zip(raw, good.values()) if split == "heldout")
    lo = max(1, min(len(sims) // 5, int(np.searchsorted(sims, heldout_max)) - len(sims) // 10 - 3))
    gaps = np.diff(sims[lo: lo + len(sims) // 10 + 2])
    i = lo + int(np.argmax(gaps))
    threshold = float((sims[i] + sims[i + 1]) / 2)
    cfg = EmbedConfig(clip_arch="tiny", clip_pretrained=None, batch_size=16, min_similarity=threshold)
    ctx = StageContext("embed", root, out, {"ingest": ingest}, seed=0, show_progress=False)
    counts = run(cfg, ctx)
    return Embedded(ingest, out, counts, threshold, weights, good)
