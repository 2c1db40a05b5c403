"""open_clip's eval image preprocessing up to the tensor conversion, with PIL and numpy only.

Decode workers use this so they never import torch (a torch import costs seconds and hundreds of
MB per process). For open_clip's default eval transform (resize_mode "shortest", square size) it
does exactly what torchvision does on a PIL image: `Resize(size)` = shorter side to `size` with
the long side truncated to int, PIL resample; `CenterCrop` with rounded offsets; then RGB.
Other resize modes fall back to open_clip's own transform (importing torch).
`tests/test_clip.py` checks the equality against open_clip's transform.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from PIL import Image

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "random": Image.Resampling.BICUBIC}


def import_open_clip():
    """open_clip, imported with no wandb in sight. timm (under open_clip) imports wandb when it is
    installed (img2dataset requires it), and wandb makes two temporary directories at import that a
    Ray worker, stopped rather than exiting, leaves in /tmp for good. Nothing here logs to wandb;
    it imports later as usual."""
    blocked = "wandb" not in sys.modules
    if blocked:
        sys.modules["wandb"] = None  # `import wandb` raises ImportError, which timm expects
    try:
        import open_clip
    finally:
        if blocked and sys.modules.get("wandb", ...) is None:
            del sys.modules["wandb"]
    return open_clip


class ImagePreprocessor:
    """PIL image → resized, centre-cropped RGB uint8 array (H, W, 3), as open_clip's eval transform
    before ToTensor/Normalize. Picklable; built from a preprocess cfg dict (open_clip's keys)."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cfg).items()}
        size = self.cfg["size"]
        height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.image_size = height
        self._square_shortest = height == width and self.cfg.get("resize_mode", "shortest") in (None, "shortest")
        self._resample = _RESAMPLE[self.cfg.get("interpolation") or "bicubic"]
        self._fallback = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_fallback"} | {"_fallback": None}

    def _torchvision_steps(self):
        if self._fallback is None:
            open_clip = import_open_clip()
            cfg = self.cfg
            size = tuple(cfg["size"]) if isinstance(cfg["size"], list) else cfg["size"]
            transform = open_clip.image_transform(
                size, is_train=False, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"),
                fill_color=cfg.get("fill_color", 0))
            steps = list(transform.transforms)
            self._fallback = steps[: next(i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__)]
        return self._fallback

    def __call__(self, image: Image.Image) -> np.ndarray:
        if not self._square_shortest:
            for step in self._torchvision_steps():
                image = step(image)
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
        s = self.image_size
        w, h = image.size
        # torchvision.transforms.functional.resize(img, [s]) on PIL: shorter side -> s, long side int()
        if w <= h:
            new_w, new_h = s, int(s * h / w)
        else:
            new_w, new_h = int(s * w / h), s
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), self._resample)
        # torchvision center_crop: offsets int(round((dim - crop) / 2))
        top, left = int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))
        image = image.crop((left, top, left + s, top + s))
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
