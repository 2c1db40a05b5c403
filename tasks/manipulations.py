"""The paper's section 3 and 4 manipulations on real held-out images, for the evaluate stage:
strips for the report and the checks that they work.

    inversion_psnr          DDIM inversion then eta = 0 decoding reconstructs the image (dB, decoder size)
    variation_consistency   share of eta = 1 variations whose colour and shape are the source's
                            (synthetic shapes, one-object images, scored by tasks.shapes): one
                            variation each of `variation_images` sources, as a few sources make a
                            coin toss of it (one demo decoder: 0.75 on 8 sources x 4, 0.92 on 48 x 2,
                            0.93 on 96 x 1); variation_sources: how many were scored
Strips (PNG, one captioned row each): variations, interpolation, text diff, PCA probe.

Runs on the driver: decoder chains over ~100 images, about a minute on 2 CPU cores with the demo's decoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.grids import to_uint8


@dataclass
class Settings:
    steps: int  # decoder DDIM steps of the variations and interpolations
    inversion_steps: int  # DDIM inversion's error shrinks with its step count (the reconstruction uses as many)
    upsampler_steps: int
    images: int = 8  # held-out images inverted (at inversion_steps) and interpolated
    variation_images: int = 96  # held-out images varied once and scored (inverted at `steps`, as they are decoded)
    variations: int = 4  # eta = 1 variations of each of the strip's two images
    frames: int = 6  # interpolation and text-diff frames
    guidance: float = 1.0  # decoder guidance of the manipulations, inversion included (evaluate: its decoder_guidance)
    variation_guidance: float = 1.0  # the eta = 1 variations' decoding, from z_i alone (evaluate: its variation_guidance)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 images (N, H, W, C), torchmetrics' definition."""
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio

    x, y = (torch.from_numpy(np.asarray(v, np.float64)) for v in (a, b))
    return peak_signal_noise_ratio(x, y, data_range=255.0, reduction="none", dim=(1, 2, 3)).numpy()


def _tensor(images: np.ndarray, device):
    import torch

    return torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2).to(device) / 127.5 - 1


def _other_colour(caption: str) -> str | None:
    """The caption with its first colour word swapped for another colour (synthetic shapes)."""
    from tasks.shapes import COLOURS

    names = list(COLOURS)
    for word in caption.split():
        if word in names:
            return caption.replace(word, names[(names.index(word) + 1) % len(names)], 1)
    return None


def run(stack, images: np.ndarray, image_emb: np.ndarray, captions: list[str], objects: list[str] | None,
        settings: Settings, out_dir: Path, score_size: int) -> tuple[dict[str, float], list[Path]]:
    """images: (N, S, S, 3) uint8 real held-out images at the stack's output size, with their z_i
    and captions (and scene JSON on the synthetic shapes). Returns (metrics, strip PNGs)."""
    import torch

    from models.unclip import Stage
    from models.upsampler import downsample_to
    from tasks.grids import captioned_grid
    from tasks.metrics import scene_accuracy
    from tasks.report import to_png

    unclip = stack.unclip
    device = next(unclip.decoder.parameters()).device
    size = unclip.decoder.config.image_size
    if objects is not None:  # one-object scenes: the variations can be scored against their source
        one = [i for i, o in enumerate(objects) if len(json.loads(o)) == 1]
        order = one + [i for i in range(len(images)) if i not in set(one)]
    else:
        order = list(range(len(images)))
    pick = order[: settings.images]
    x0 = _tensor(images[pick], device)
    z = torch.from_numpy(image_emb[pick]).float().to(device)
    ups = [Stage(steps=settings.upsampler_steps)] * len(unclip.upsamplers)
    generator = torch.Generator(device=device).manual_seed(0)
    common = dict(steps=settings.steps, guidance_scale=settings.guidance)

    x_T = unclip.invert(x0, z, steps=settings.inversion_steps, guidance_scale=settings.guidance)
    exact = Stage(steps=settings.inversion_steps, sampler="ddim", eta=0.0, guidance_scale=settings.guidance, clip_sample=None)
    rebuilt = unclip.decode(z, decoder=exact, x_T=x_T, upsample=False)
    target = to_uint8(downsample_to(x0, size) if x0.shape[-1] != size else x0)  # what invert() saw
    metrics = {"inversion_psnr": float(psnr(to_uint8(rebuilt), target).mean())}

    scored = settings.variation_images if objects is not None else 0
    vary = order[: max(scored, 2)]  # starts with `pick`'s first two: the strip's
    z_vary = torch.from_numpy(image_emb[vary]).float().to(device)
    x_T_vary = unclip.invert(_tensor(images[vary], device), z_vary, **common)
    varying = dict(common, guidance_scale=settings.variation_guidance)
    if scored:
        varied = to_uint8(unclip.variations(z_vary, x_T_vary, 1, eta=1.0, generator=generator, upsamplers=ups, **varying))
        single = [k for k, i in enumerate(vary) if len(json.loads(objects[i])) == 1]
        if single:
            acc = scene_accuracy(varied[single], [objects[vary[k]] for k in single], score_size)
            metrics["variation_consistency"] = acc["one_object_acc"]
            metrics["variation_sources"] = float(len(single))

    strips = []
    n = settings.variations
    shown = to_uint8(unclip.variations(z_vary[:2], x_T_vary[:2], n, eta=1.0, generator=generator, upsamplers=ups, **varying))
    rows = [(f"{captions[i]}: real | {n} variations (eta 1)", [images[i], *shown[k * n:(k + 1) * n]])
            for k, i in enumerate(vary[:2])]
    strips.append(to_png(captioned_grid(rows, stack.image_size), out_dir / "variations.png"))

    thetas = np.linspace(0, 1, settings.frames).tolist()
    frames = unclip.interpolate(z[0], z[1], thetas, x_T_a=x_T[:1], x_T_b=x_T[1:2], upsamplers=ups, **common)
    rows = [(f"{captions[pick[0]]} -> {captions[pick[1]]}", [images[pick[0]], *to_uint8(frames), images[pick[1]]])]
    strips.append(to_png(captioned_grid(rows, stack.image_size), out_dir / "interpolation.png"))

    source = captions[pick[0]]
    goal = _other_colour(source) or captions[pick[1]]
    thetas = np.linspace(0, 0.5, settings.frames).tolist()
    frames = unclip.text_diff(z[:1], x_T[:1], unclip.encode_text([goal]), unclip.encode_text([source]), thetas,
                              upsamplers=ups, **common)
    rows = [(f"text diff '{source}' -> '{goal}', theta 0 to 0.5", [images[pick[0]], *to_uint8(frames)])]
    strips.append(to_png(captioned_grid(rows, stack.image_size), out_dir / "text_diff.png"))

    if stack.pca is not None:
        available = stack.pca.components.shape[0]
        ks = [2**i for i in range(available.bit_length()) if 2**i < available] + [available]
        frames = unclip.pca_probe(z[:1], stack.pca, ks, upsamplers=ups, **common)
        rows = [(f"first {', '.join(map(str, ks))} PCA dims of z_i", [images[pick[0]], *to_uint8(frames)])]
        strips.append(to_png(captioned_grid(rows, stack.image_size), out_dir / "pca_probe.png"))
    return metrics, strips
