"""The shapes scorer: exact on clean renders, honest on the noisy, tinted, blurred images a
half-trained decoder leaves."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from tasks.shapes import BACKGROUND, score_image, score_matches
from tasks.synth import generate


def _to_resolution(image: Image.Image, size: int = 64) -> Image.Image:
    """What ingest delivers: resized and JPEG-encoded."""
    buffer = io.BytesIO()
    image.resize((size, size), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=95)
    return Image.open(buffer)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(out, 900, seed=11, progress=False)
    return out, pq.read_table(out / "captions.parquet").to_pylist()


@pytest.mark.parametrize("size, bar", [(64, 0.99), (32, 0.9)])
def test_scorer_reads_generated_images(dataset, size, bar):
    out, rows = dataset
    rows = rows[:400]
    correct = sum(score_matches(_to_resolution(Image.open(out / r["path"]), size), r["objects"]) for r in rows)
    assert correct / len(rows) >= bar


def _like_a_half_trained_decoder(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    """At 64 px: a slight blur, a colour cast (per-channel gain and offset) and Gaussian grain."""
    image = image.resize((64, 64), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 0.8)))
    pixels = np.asarray(image, dtype=np.float32) * rng.uniform(0.92, 1.08, 3) + rng.uniform(-20, 20, 3)
    pixels += rng.normal(0, sigma, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


@pytest.mark.parametrize("sigma", [12, 20])
def test_scorer_is_right_on_noisy_tinted_blurred_heldout_renders(dataset, sigma):
    """The demo's quality bars measure the model, not the scorer: >= 95% right on held-out
    renders corrupted the way a half-trained decoder's samples are (measured on these 190: 100%
    at sigma 12, 16 and 20; the clean-background scorer this replaced: 94%, 88%, 88%)."""
    out, rows = dataset
    heldout = [r for r in rows if r["split"] == "heldout"]
    assert len(heldout) >= 150
    rng = np.random.default_rng(sigma)
    correct = sum(score_matches(_like_a_half_trained_decoder(Image.open(out / r["path"]), sigma, rng), r["objects"]) for r in heldout)
    assert correct / len(heldout) >= 0.95


def test_scorer_reports_colour_shape_and_place():
    from tasks.shapes import ShapeObject, render

    image = render([ShapeObject("orange", "triangle", "large", 0.27, 0.5), ShapeObject("blue", "cross", "small", 0.73, 0.5)], 128)
    found = score_image(image.resize((64, 64), Image.Resampling.BICUBIC))
    assert [(d.colour, d.shape) for d in found] == [("orange", "triangle"), ("blue", "cross")]  # largest first
    assert abs(found[0].cx - 0.27) < 0.03 and abs(found[1].cx - 0.73) < 0.03 and abs(found[0].cy - 0.5) < 0.05


def test_scorer_finds_nothing_in_a_blank_image():
    assert score_image(Image.new("RGB", (64, 64), BACKGROUND)) == []
    tinted = np.clip(np.full((64, 64, 3), (250, 215, 230), np.float32) + np.random.default_rng(0).normal(0, 20, (64, 64, 3)), 0, 255)
    assert score_image(tinted.astype(np.uint8)) == []
