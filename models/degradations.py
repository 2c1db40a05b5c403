"""Corruptions of the upsamplers' low-resolution conditioning images (paper section 2.1).

First upsampler: a light Gaussian blur (paper: kernel 3, sigma 0.6). Second upsampler: a
BSR-style degradation (Zhang et al. 2021, "Designing a Practical Degradation Model for Deep Blind
Image Super-Resolution"): random isotropic/anisotropic blur, random down-up resize with mixed
interpolation, Gaussian noise (in random order), then JPEG re-compression. kornia is not a
dependency here; these are torch/torchvision ops. Batches are float (B, C, H, W) in [-1, 1] on
any device; `bsr_degrade_image` degrades one image (uint8 or float, HWC or CHW) where data is
prepared. Every random choice comes from a seed, so a seed makes a degradation reproducible.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms.functional import gaussian_blur as tv_gaussian_blur

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area")


def _check(x: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{name} must be a float (B, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")


def downsample_to(hi: torch.Tensor, size: int) -> torch.Tensor:
    """The clean low-resolution image (bicubic, antialiased; clamped to [-1, 1]) that a corruption
    starts from."""
    return F.interpolate(hi, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)


def gaussian_blur(x: torch.Tensor, kernel_size: int = 3, sigma: float = 0.6) -> torch.Tensor:
    """The first upsampler's corruption (paper: kernel 3, sigma 0.6)."""
    _check(x)
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"kernel_size={kernel_size} must be a positive odd number")
    if sigma <= 0:
        raise ValueError(f"sigma={sigma} must be > 0")
    return tv_gaussian_blur(x, [kernel_size, kernel_size], [sigma, sigma])


def anisotropic_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """Normalised 2-D Gaussian kernel with covariance R diag(sx^2, sy^2) R^T (R rotates by theta)."""
    c, s = math.cos(theta), math.sin(theta)
    R = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    cov = R @ torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64)) @ R.T
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    grid = torch.stack(torch.meshgrid(r, r, indexing="xy"), dim=-1)  # (size, size, 2) as (x, y)
    k = torch.exp(-0.5 * torch.einsum("...i,ij,...j->...", grid, torch.linalg.inv(cov), grid))
    return (k / k.sum()).float()


def blur_with_kernel(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    C, k = x.shape[1], kernel.shape[-1]
    weight = kernel.to(x).expand(C, 1, k, k)
    return F.conv2d(F.pad(x, [k // 2] * 4, mode="reflect"), weight, groups=C)


@dataclass
class BSRConfig:
    blur_prob: float = 1.0
    aniso_prob: float = 0.5  # anisotropic (rotated) vs isotropic blur
    kernel_size: int = 7
    sigma: tuple[float, float] = (0.2, 2.0)
    resize_prob: float = 1.0
    resize_scale: tuple[float, float] = (0.5, 1.0)  # down to this fraction, then back up
    noise_prob: float = 1.0
    noise_std: tuple[float, float] = (1 / 255, 25 / 255)  # on the [0, 1] scale
    jpeg_prob: float = 1.0
    jpeg_quality: tuple[int, int] = (30, 95)


# Every random choice of one image's degradation comes from a numpy Generator: host-side draws
# (no device synchronisation per choice, whatever device the images are on), and the same
# function runs per image where data is prepared (`bsr_degrade_image`, e.g. in a Ray Data map).


def _random_blur(img, cfg: BSRConfig, rng: np.random.Generator):
    if rng.random() < cfg.aniso_prob:
        kernel = anisotropic_kernel(cfg.kernel_size, rng.uniform(*cfg.sigma), rng.uniform(*cfg.sigma), rng.uniform(0.0, math.pi))
    else:
        s = rng.uniform(*cfg.sigma)
        kernel = anisotropic_kernel(cfg.kernel_size, s, s, 0.0)
    return blur_with_kernel(img, kernel)


def _random_resize(img, cfg: BSRConfig, rng: np.random.Generator):
    H, W = img.shape[-2:]
    scale = rng.uniform(*cfg.resize_scale)
    size = (max(1, round(H * scale)), max(1, round(W * scale)))
    down, up = INTERPOLATIONS[rng.integers(len(INTERPOLATIONS))], INTERPOLATIONS[1 + rng.integers(2)]  # mixed modes
    small = F.interpolate(img, size=size, mode=down, **({"align_corners": False} if down in ("bilinear", "bicubic") else {}))
    return F.interpolate(small, size=(H, W), mode=up, align_corners=False)


def _random_noise(img, cfg: BSRConfig, rng: np.random.Generator):
    std = rng.uniform(*cfg.noise_std) * 2  # [0, 1] scale -> [-1, 1] scale
    return img + std * torch.from_numpy(rng.standard_normal(img.shape, dtype=np.float32)).to(img)


def jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip of one (1, C, H, W) image in [-1, 1] through torchvision's codec."""
    u8 = ((img[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs for torchcodec; still works
        warnings.simplefilter("ignore", DeprecationWarning)
        out = decode_jpeg(encode_jpeg(u8, quality=int(quality)))
    return (out.float() / 127.5 - 1).unsqueeze(0).to(img)


def _bsr_one(img: torch.Tensor, rng: np.random.Generator, cfg: BSRConfig) -> torch.Tensor:
    """BSR of one float (1, C, H, W) CPU image in [-1, 1]."""
    ops = [(cfg.blur_prob, _random_blur), (cfg.resize_prob, _random_resize), (cfg.noise_prob, _random_noise)]
    for i in rng.permutation(len(ops)):  # BSR shuffles the order
        prob, op = ops[i]
        if rng.random() < prob:
            img = op(img, cfg, rng)
    img = img.clamp(-1, 1)
    if rng.random() < cfg.jpeg_prob:
        img = jpeg(img, round(rng.uniform(*cfg.jpeg_quality)))
    return img


def _channels_last(shape: tuple[int, ...], channels_last: bool | None) -> bool:
    if len(shape) != 3:
        raise ValueError(f"image must be one (H, W, C) or (C, H, W) image, got shape {shape}")
    if channels_last is None:
        last, first = shape[-1] in (1, 3), shape[0] in (1, 3)
        if last == first:
            raise ValueError(f"cannot tell whether an image of shape {shape} is (H, W, C) or (C, H, W) with 1 or 3 "
                             "channels; pass channels_last=True or False")
        channels_last = last
    if shape[-1 if channels_last else 0] not in (1, 3):
        raise ValueError(f"image of shape {shape} has {shape[-1 if channels_last else 0]} channels; JPEG needs 1 or 3")
    return channels_last


def bsr_degrade_image(image, rng: np.random.Generator | int | None = None, config: BSRConfig | None = None, *,
                      channels_last: bool | None = None):
    """The second upsampler's corruption of one image, where data is prepared (e.g. a Ray Data map).

    image: a numpy array or torch tensor, (H, W, C) or (C, H, W) (inferred when unambiguous, else
    give channels_last), 1 or 3 channels; uint8 with values 0..255 or float with values in [-1, 1].
    rng: a numpy Generator, a seed, or None (fresh entropy). Returns the same kind of array, dtype,
    layout and value range (float results stay in [-1, 1]).
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    is_numpy = isinstance(image, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(image)) if is_numpy else image
    hwc = _channels_last(tuple(x.shape), channels_last)
    chw = x.permute(2, 0, 1) if hwc else x
    if chw.dtype == torch.uint8:
        img = chw.cpu().float() / 127.5 - 1
    elif chw.is_floating_point():
        img = chw.detach().cpu().float()
    else:
        raise ValueError(f"image has dtype {x.dtype}; expected uint8 (0..255) or float ([-1, 1])")
    out = _bsr_one(img[None], rng, config or BSRConfig())[0]
    out = ((out + 1) * 127.5).round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else out.to(x.dtype)
    out = out.permute(1, 2, 0).contiguous() if hwc else out
    return out.numpy() if is_numpy else out.to(x.device)


def bsr_degrade(x: torch.Tensor, generator: torch.Generator | None = None, config: BSRConfig | None = None) -> torch.Tensor:
    """The second upsampler's corruption of a float (B, C, H, W) batch in [-1, 1] on any device;
    each image draws its own degradation (`bsr_degrade_image`, on the CPU: JPEG is a CPU codec)
    from a seed drawn from `generator` (on its own device) or, without one, from torch's global
    generator, so torch.manual_seed makes it reproducible."""
    _check(x)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"x has {x.shape[1]} channels; JPEG needs 1 or 3")
    cfg = config or BSRConfig()
    device = generator.device if generator is not None else "cpu"
    seeds = torch.randint(0, 2**62, (x.shape[0],), generator=generator, device=device).tolist()
    out = [_bsr_one(img, np.random.default_rng(seed), cfg) for img, seed in zip(x.detach().float().cpu().split(1), seeds)]
    return torch.cat(out).to(device=x.device, dtype=x.dtype)


def degrade(x: torch.Tensor, kind: str, generator: torch.Generator | None = None, *, blur_kernel: int = 3,
            blur_sigma: float = 0.6, bsr: BSRConfig | None = None) -> torch.Tensor:
    """Dispatch by name: "none", "blur" (first upsampler) or "bsr" (second upsampler)."""
    if kind == "none":
        return x
    if kind == "blur":
        return gaussian_blur(x, blur_kernel, blur_sigma)
    if kind == "bsr":
        return bsr_degrade(x, generator, bsr)
    raise ValueError(f"degradation={kind!r}; allowed: ('none', 'blur', 'bsr')")
