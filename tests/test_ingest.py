"""Ingest against a real 127.0.0.1 server where a third of the URLs are bad, via real img2dataset."""

import io
import json
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.context import StageContext
from tasks.ingest import IngestConfig, IngestError, run
from tasks.shapes import ShapeObject, render
from tests.bad_web import image_server, jpeg_bytes

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


def _good_images(n):
    return [render([ShapeObject(COLOURS[i % 6], "square", "large", 0.5, 0.5)], 128) for i in range(n)]


def _read_shards(out_dir: Path) -> dict[str, dict]:
    """key -> {"caption", "json", "image"} from every tar shard."""
    samples: dict[str, dict] = {}
    for tar_path in sorted(out_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.rsplit(".", 1)
                data = tar.extractfile(member).read()
                sample = samples.setdefault(key, {})
                if ext == "jpg":
                    sample["image"] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
                elif ext == "txt":
                    sample["caption"] = data.decode()
                elif ext == "json":
                    sample["json"] = json.loads(data)
    return samples


@pytest.fixture(scope="module")
def bad_web_ingest(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ingest")
    good = _good_images(12)
    big = Image.new("RGB", (1500, 1500), (200, 30, 30))
    jpeg = jpeg_bytes(good[0])
    routes = {f"/good/{i}.jpg": (200, {"Content-Type": "image/jpeg"}, jpeg_bytes(img), 0.0) for i, img in enumerate(good)}
    bad = {
        "/missing.jpg": ("http_404", None),
        "/hangs.jpg": ("timeout", (200, {}, jpeg, 4.0)),
        "/text.jpg": ("decode_error", (200, {"Content-Type": "text/html"}, b"<html>not an image</html>", 0.0)),
        "/truncated.jpg": ("decode_error", (200, {"Content-Type": "image/jpeg"}, jpeg[: len(jpeg) // 2], 0.0)),
        "/huge.jpg": ("too_large", (200, {"Content-Type": "image/jpeg"}, jpeg_bytes(big), 0.0)),
        "/noai.jpg": ("opted_out", (200, {"Content-Type": "image/jpeg", "X-Robots-Tag": "noai"}, jpeg, 0.0)),
    }
    routes.update({path: route for path, (_, route) in bad.items() if route})
    with image_server(routes) as base:
        rows = [{"url": f"{base}/good/{i}.jpg", "caption": f"good {i}", "ref": f"g{i}"} for i in range(len(good))]
        rows += [{"url": f"{base}{path}", "caption": f"bad {path}", "ref": path} for path in bad]
        rng = np.random.default_rng(0)
        frame = pd.DataFrame(rows).iloc[rng.permutation(len(rows))]  # bad ones spread over shards
        frame.to_parquet(tmp / "urls.parquet", index=False)
        cfg = IngestConfig(
            url_list=str(tmp / "urls.parquet"),
            additional_columns=["ref"],
            image_size=32,
            shard_size=5,
            processes=1,
            threads=4,
            timeout_s=2,
            max_image_area=1000 * 1000,
            max_failure_rate=0.5,
        )
        out = tmp / "out"
        out.mkdir()
        tmpdir = tmp / "tmpdir"  # the process's temporary directory, for its spawned processes too
        tmpdir.mkdir()
        import img2dataset  # noqa: F401  (this process's own import-time directories live until it exits)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TMPDIR", str(tmpdir))
            patch.setattr(tempfile, "tempdir", str(tmpdir))
            counts = run(cfg, StageContext("ingest", tmp, out))
    return counts, out, good, bad, sorted(p.name for p in tmpdir.iterdir())


def test_every_good_pair_arrives_with_its_pixels(bad_web_ingest):
    counts, out, good, bad, _ = bad_web_ingest
    samples = _read_shards(out)
    by_ref = {s["json"]["ref"]: s for s in samples.values()}
    assert sorted(by_ref) == sorted(f"g{i}" for i in range(len(good)))  # no bad pair slipped in
    for i, source in enumerate(good):
        sample = by_ref[f"g{i}"]
        assert sample["caption"] == f"good {i}"
        expected = np.asarray(source.resize((32, 32), Image.Resampling.BOX), dtype=np.float32)
        assert np.abs(sample["image"] - expected).mean() < 6.0  # same picture, JPEG-close


def test_every_bad_url_is_counted_under_its_reason(bad_web_ingest):
    counts, out, good, bad, _ = bad_web_ingest
    expected: dict[str, int] = {}
    for reason, _ in bad.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert counts["total"] == len(good) + len(bad)
    assert counts["success"] == len(good)
    assert counts["shards"] == 4
    assert {k[len("failed_"):]: v for k, v in counts.items() if k.startswith("failed_") and k not in ("failed_to_download", "failed_to_resize")} == expected
    assert counts["failed_to_download"] + counts["failed_to_resize"] == len(bad)


def test_ingest_leaves_nothing_in_the_temporary_directory(bad_web_ingest):
    *_, leftovers = bad_web_ingest
    assert leftovers == []  # img2dataset's processes import wandb, which makes directories there


def test_failure_rate_above_the_limit_fails_with_a_clear_message(tmp_path):
    with image_server({}) as base:  # every URL is a 404
        pd.DataFrame({"url": [f"{base}/{i}.jpg" for i in range(4)], "caption": ["x"] * 4}).to_parquet(tmp_path / "u.parquet")
        cfg = IngestConfig(url_list=str(tmp_path / "u.parquet"), image_size=16, shard_size=10, processes=1, threads=2, max_failure_rate=0.2)
        (tmp_path / "out").mkdir()
        with pytest.raises(IngestError, match=r"100% of 4 URLs failed.*max_failure_rate=0.2.*http_404=4"):
            run(cfg, StageContext("ingest", tmp_path, tmp_path / "out"))
