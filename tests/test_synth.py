"""Synthetic dataset: deterministic, held-out pairs unseen in training (the scorer: test_shapes.py)."""

import io
import json

import pyarrow.parquet as pq
from PIL import Image

from tasks.shapes import HELDOUT_PAIRS
from tasks.synth import generate


def _to_demo_resolution(image: Image.Image, size: int = 64) -> Image.Image:
    """What ingest delivers: resized and JPEG-encoded."""
    buffer = io.BytesIO()
    image.resize((size, size), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=95)
    return Image.open(buffer)


def test_generation_is_deterministic_by_seed(tmp_path):
    generate(tmp_path / "a", 40, seed=3, progress=False)
    generate(tmp_path / "b", 40, seed=3, progress=False)
    generate(tmp_path / "c", 40, seed=4, progress=False)
    a, b, c = (pq.read_table(tmp_path / d / "captions.parquet").to_pylist() for d in "abc")
    assert a == b and a != c
    assert (tmp_path / "a/images/0000007.png").read_bytes() == (tmp_path / "b/images/0000007.png").read_bytes()
    assert Image.open(tmp_path / "a/images/0000007.png").size == (128, 128)


def test_heldout_split_has_pairs_never_seen_in_training(tmp_path):
    generate(tmp_path, 600, seed=0, progress=False)
    rows = pq.read_table(tmp_path / "captions.parquet").to_pylist()
    pairs = {split: set() for split in ("train", "heldout")}
    for row in rows:
        for o in json.loads(row["objects"]):
            pairs[row["split"]].add((o["colour"], o["shape"]))
    assert pairs["train"].isdisjoint(HELDOUT_PAIRS)
    assert pairs["heldout"] & HELDOUT_PAIRS
    # every colour and every shape is still taught in training
    assert {c for c, _ in pairs["train"]} == {c for c, _ in pairs["train"] | pairs["heldout"]}
    assert {s for _, s in pairs["train"]} == {s for _, s in pairs["train"] | pairs["heldout"]}
    captions = [r["caption"] for r in rows]
    assert len(set(captions)) > 300  # varied wording, not one template
    assert any(" above " in c for c in captions) and any(" on the left" in c for c in captions)
    assert not any(" a o" in c or c.startswith("a o") for c in captions)  # "an orange"


def test_sizes_left_unnamed_are_still_drawn(tmp_path):
    """sizes_named changes the captions only: the same scenes, and no caption (or half of them) naming a size."""
    for share in (1.0, 0.0, 0.5):
        generate(tmp_path / str(share), 400, seed=5, progress=False, sizes_named=share)
    rows = {share: pq.read_table(tmp_path / str(share) / "captions.parquet").to_pylist() for share in (1.0, 0.0, 0.5)}
    assert [r["objects"] for r in rows[1.0]] == [r["objects"] for r in rows[0.0]] == [r["objects"] for r in rows[0.5]]
    assert (tmp_path / "1.0/images/0000011.png").read_bytes() == (tmp_path / "0.0/images/0000011.png").read_bytes()

    def naming(caption: str) -> bool:
        return any(word in caption.split() for word in ("small", "large"))

    assert sum(naming(r["caption"]) for r in rows[1.0]) > 300  # most wordings name a size
    assert not any(naming(r["caption"]) for r in rows[0.0])
    assert 0.3 < sum(naming(r["caption"]) for r in rows[0.5]) / sum(naming(r["caption"]) for r in rows[1.0]) < 0.7
    assert {o["size"] for r in rows[0.0] for o in json.loads(r["objects"])} == {"small", "large"}
    assert not any("  " in r["caption"] or r["caption"] != r["caption"].strip() for r in rows[0.0])
    assert not any(" a o" in r["caption"] or r["caption"].startswith("a o") for r in rows[0.0])  # "an orange"
