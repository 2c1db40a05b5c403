"""Corruptions of the upsamplers' low-resolution conditioning images (paper section 2.1).

First upsampler: a light Gaussian blur (paper: kernel 3, sigma 0.6). Second upsampler: a
BSR-style degradation (Zhang et al. 2021, "Designing a Practical Degradation Model for Deep Blind
Image Super-Resolution"): random isotropic/anisotropic blur, random down-up resize with mixed
interpolation, Gaussian noise (in random order), then JPEG re-compression. kornia is not a
dependency here; these are torch/torchvision ops. Images are float (B, C, H, W) in [-1, 1];
every random choice comes from the `generator`, so a seed makes a degradation reproducible.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms.functional import gaussian_blur as tv_gaussian_blur

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area")


def _check(x: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{name} must be a float (B, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")


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


def _uniform(lo_hi, generator) -> float:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def _choice(options, generator):
    return options[int(torch.randint(len(options), (), generator=generator))]


def _random_blur(img, cfg: BSRConfig, generator):
    if torch.rand((), generator=generator).item() < cfg.aniso_prob:
        kernel = anisotropic_kernel(cfg.kernel_size, _uniform(cfg.sigma, generator), _uniform(cfg.sigma, generator),
                                    _uniform((0.0, math.pi), generator))
    else:
        s = _uniform(cfg.sigma, generator)
        kernel = anisotropic_kernel(cfg.kernel_size, s, s, 0.0)
    return blur_with_kernel(img, kernel)


def _random_resize(img, cfg: BSRConfig, generator):
    H, W = img.shape[-2:]
    scale = _uniform(cfg.resize_scale, generator)
    size = (max(1, round(H * scale)), max(1, round(W * scale)))
    down, up = _choice(INTERPOLATIONS, generator), _choice(INTERPOLATIONS[1:3], generator)  # mixed modes
    small = F.interpolate(img, size=size, mode=down, **({"align_corners": False} if down in ("bilinear", "bicubic") else {}))
    return F.interpolate(small, size=(H, W), mode=up, align_corners=False)


def _random_noise(img, cfg: BSRConfig, generator):
    std = _uniform(cfg.noise_std, generator) * 2  # [0, 1] scale -> [-1, 1] scale
    return img + std * torch.randn(img.shape, generator=generator).to(img)


def jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip of one (1, C, H, W) image in [-1, 1] through torchvision's codec."""
    u8 = ((img[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs for torchcodec; still works
        warnings.simplefilter("ignore", DeprecationWarning)
        out = decode_jpeg(encode_jpeg(u8, quality=int(quality)))
    return (out.float() / 127.5 - 1).unsqueeze(0).to(img)


def bsr_degrade(x: torch.Tensor, generator: torch.Generator, config: BSRConfig | None = None) -> torch.Tensor:
    """The second upsampler's corruption; each image of the batch draws its own degradation."""
    _check(x)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"x has {x.shape[1]} channels; JPEG needs 1 or 3")
    cfg = config or BSRConfig()
    ops = [(cfg.blur_prob, _random_blur), (cfg.resize_prob, _random_resize), (cfg.noise_prob, _random_noise)]
    out = []
    for img in x.float().split(1):
        for i in torch.randperm(len(ops), generator=generator).tolist():  # BSR shuffles the order
            prob, op = ops[i]
            if torch.rand((), generator=generator).item() < prob:
                img = op(img, cfg, generator)
        img = img.clamp(-1, 1)
        if torch.rand((), generator=generator).item() < cfg.jpeg_prob:
            img = jpeg(img, round(_uniform(cfg.jpeg_quality, generator)))
        out.append(img)
    return torch.cat(out).to(x.dtype)


def degrade(x: torch.Tensor, kind: str, generator: torch.Generator | None = None, *, blur_kernel: int = 3,
            blur_sigma: float = 0.6, bsr: BSRConfig | None = None) -> torch.Tensor:
    """Dispatch by name: "none", "blur" (first upsampler) or "bsr" (second upsampler)."""
    if kind == "none":
        return x
    if kind == "blur":
        return gaussian_blur(x, blur_kernel, blur_sigma)
    if kind == "bsr":
        if generator is None:
            raise ValueError("degradation 'bsr' needs a torch.Generator (it is random)")
        return bsr_degrade(x, generator, bsr)
    raise ValueError(f"degradation={kind!r}; allowed: ('none', 'blur', 'bsr')")
