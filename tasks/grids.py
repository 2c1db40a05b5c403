"""PNG grids of images, one caption under each row (the sampling CLI's output; anything that shows
samples can use it).

    grid = captioned_grid([("a red circle", images_a), ("a blue square", images_b)], tile=64)
    grid.size == grid_size(rows=2, cols=max(len(images_a), len(images_b)), tile=64)

Tiles are square, `tile` pixels; a row shorter than the widest is padded with black. The caption
sits in a CAPTION_BAND-pixel band under its row, cut with "..." to the row's width.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CAPTION_BAND = 16  # pixels
FONT_SIZE = 11


def to_uint8(images) -> np.ndarray:
    """Model output (B, 3, H, W) torch tensor in [-1, 1] -> (B, H, W, 3) uint8 images."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def grid_size(rows: int, cols: int, tile: int) -> tuple[int, int]:
    """(width, height) of a grid of rows x cols square tiles with a caption band under each row."""
    return cols * tile, rows * (tile + CAPTION_BAND)


def to_pil(image: np.ndarray | Image.Image, tile: int) -> Image.Image:
    """(H, W, 3) uint8 array or PIL image -> RGB tile x tile (resized only when it is another size)."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    image = image.convert("RGB")
    return image if image.size == (tile, tile) else image.resize((tile, tile), Image.Resampling.BICUBIC)


def captioned_grid(rows: Sequence[tuple[str, Sequence[np.ndarray | Image.Image]]], tile: int) -> Image.Image:
    if not rows:
        raise ValueError("captioned_grid needs at least one row")
    cols = max(len(images) for _, images in rows)
    grid = Image.new("RGB", grid_size(len(rows), cols, tile), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=FONT_SIZE)
    for r, (caption, images) in enumerate(rows):
        top = r * (tile + CAPTION_BAND)
        grid.paste(Image.new("RGB", (cols * tile, tile)), (0, top))
        for c, image in enumerate(images):
            grid.paste(to_pil(image, tile), (c * tile, top))
        text = fit_text(draw, caption, font, cols * tile - 4)
        draw.text((2, top + tile + (CAPTION_BAND - FONT_SIZE) // 2 - 1), text, fill="black", font=font)
    return grid


def fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, or its longest prefix + "..." that is at most `width` pixels wide."""
    text = " ".join(text.split())
    if draw.textlength(text, font=font) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # the longest prefix that fits with the ellipsis
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if draw.textlength(text[:mid].rstrip() + "...", font=font) <= width else (lo, mid - 1)
    return text[:lo].rstrip() + "..."
