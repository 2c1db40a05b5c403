"""models/degradations.py: ranges, shapes, high-frequency energy (FFT), determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import degradations as Dg


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def images(B=4, size=32, seed=0):
    """Sharp-edged test images in [-1, 1] (checkerboard + noise): lots of high frequencies."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    board = (((xx // 2 + yy // 2) % 2).float() * 2 - 1).expand(B, 3, size, size)
    return (0.7 * board + 0.3 * (torch.rand(B, 3, size, size, generator=g) * 2 - 1)).clamp(-1, 1)


def high_freq_energy(x: torch.Tensor, cutoff: float = 0.25) -> float:
    """Power above `cutoff` cycles/pixel (radially), from the 2-D FFT of the mean-free images."""
    f = torch.fft.fftshift(torch.fft.fft2(x - x.mean(dim=(-2, -1), keepdim=True)), dim=(-2, -1))
    H, W = x.shape[-2:]
    fy = torch.fft.fftshift(torch.fft.fftfreq(H))[:, None]
    fx = torch.fft.fftshift(torch.fft.fftfreq(W))[None, :]
    mask = (fx**2 + fy**2).sqrt() > cutoff
    return (f.abs() ** 2 * mask).sum().item()


def test_gaussian_blur_reduces_high_frequencies_and_keeps_shape():
    x = images()
    y = Dg.gaussian_blur(x, 3, 0.6)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert high_freq_energy(y) < 0.5 * high_freq_energy(x)
    assert high_freq_energy(Dg.gaussian_blur(x, 5, 1.5)) < high_freq_energy(y)  # more blur, less HF
    torch.testing.assert_close(y.mean(), x.mean(), atol=0.02, rtol=0)  # blur preserves the DC term


def test_anisotropic_kernel_is_normalised_and_oriented():
    k = Dg.anisotropic_kernel(9, 3.0, 0.5, 0.0)  # wide along x
    assert abs(k.sum().item() - 1) < 1e-6
    assert k[4, :].sum() > 3 * k[:, 4].sum()
    k90 = Dg.anisotropic_kernel(9, 3.0, 0.5, torch.pi / 2)
    torch.testing.assert_close(k90, k.T, atol=1e-6, rtol=0)


def test_bsr_range_shape_determinism():
    x = images(B=3)
    a = Dg.bsr_degrade(x, torch.Generator().manual_seed(7))
    b = Dg.bsr_degrade(x, torch.Generator().manual_seed(7))
    c = Dg.bsr_degrade(x, torch.Generator().manual_seed(8))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # each image draws its own degradation


def test_each_bsr_component_acts():
    x = images(B=2)
    only = lambda **kw: Dg.BSRConfig(**{"blur_prob": 0.0, "resize_prob": 0.0, "noise_prob": 0.0, "jpeg_prob": 0.0, **kw})
    g = lambda: torch.Generator().manual_seed(0)
    assert torch.equal(Dg.bsr_degrade(x, g(), only()), x)  # everything off: identity
    blurred = Dg.bsr_degrade(x, g(), only(blur_prob=1.0, sigma=(1.0, 2.0)))
    assert high_freq_energy(blurred) < 0.5 * high_freq_energy(x)
    resized = Dg.bsr_degrade(x, g(), only(resize_prob=1.0, resize_scale=(0.5, 0.5)))
    assert high_freq_energy(resized) < 0.5 * high_freq_energy(x)
    noisy = Dg.bsr_degrade(x, g(), only(noise_prob=1.0, noise_std=(0.1, 0.1)))
    resid = (noisy - x)[(x.abs() < 0.7)]  # away from the clamp
    assert abs(resid.std().item() - 0.2) < 0.03  # 0.1 on [0,1] is 0.2 on [-1,1]
    jpg = Dg.bsr_degrade(x, g(), only(jpeg_prob=1.0, jpeg_quality=(30, 30)))
    err = (jpg - x).abs().mean().item()
    assert 0.01 < err < 0.5  # lossy but still the same picture
    # quantisation to 8 bits is the floor of a JPEG round trip
    assert ((jpg + 1) * 127.5 - ((jpg + 1) * 127.5).round()).abs().max() < 1e-4


def test_degrade_dispatch_and_errors():
    x = images(B=1)
    assert torch.equal(Dg.degrade(x, "none"), x)
    torch.testing.assert_close(Dg.degrade(x, "blur"), Dg.gaussian_blur(x, 3, 0.6))
    with pytest.raises(ValueError, match="degradation"):
        Dg.degrade(x, "sharpen")
    torch.manual_seed(3)  # without a generator BSR draws from torch's global one
    a = Dg.degrade(x, "bsr")
    torch.manual_seed(3)
    assert torch.equal(a, Dg.degrade(x, "bsr"))
    with pytest.raises(ValueError, match="kernel_size"):
        Dg.gaussian_blur(x, 4, 0.6)


def test_bsr_with_any_generator_or_none_keeps_dtype_and_device():
    x = images(B=2).to(torch.bfloat16)
    a = Dg.bsr_degrade(x, torch.Generator().manual_seed(1))
    assert a.dtype == torch.bfloat16 and a.device == x.device and a.shape == x.shape
    torch.manual_seed(5)
    b = Dg.bsr_degrade(x)
    torch.manual_seed(5)
    assert torch.equal(b, Dg.bsr_degrade(x)) and not torch.equal(a, b)
    # a generator's seeds are drawn on its own device (a CUDA generator works the same way)
    g = torch.Generator().manual_seed(1)
    seeds = torch.randint(0, 2**62, (2,), generator=g, device=g.device).tolist()
    manual = torch.stack([Dg.bsr_degrade_image(img.float(), s) for img, s in zip(x, seeds)]).to(torch.bfloat16)
    assert torch.equal(a, manual)


def test_bsr_per_image_for_data_preparation():
    """One image, uint8 HWC (as decoded by PIL) or float CHW, numpy or torch, seed or Generator:
    same kind, dtype, layout and range back; the degradation does not depend on the layout."""
    chw = images(B=1)[0]  # float (3, 32, 32) in [-1, 1]
    u8_hwc = ((chw + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    out = Dg.bsr_degrade_image(u8_hwc, 7)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == u8_hwc.shape
    assert np.array_equal(out, Dg.bsr_degrade_image(u8_hwc, np.random.default_rng(7)))  # a seed is a Generator's seed
    assert not np.array_equal(out, Dg.bsr_degrade_image(u8_hwc, 8))
    u8_chw = np.ascontiguousarray(u8_hwc.transpose(2, 0, 1))
    assert np.array_equal(Dg.bsr_degrade_image(u8_chw, 7), out.transpose(2, 0, 1))
    # float in [-1, 1], torch CHW: the float path of the same image (up to the 8-bit input rounding)
    f = Dg.bsr_degrade_image(torch.from_numpy(u8_chw).float() / 127.5 - 1, 7)
    assert isinstance(f, torch.Tensor) and f.dtype == torch.float32 and f.shape == (3, 32, 32)
    assert f.min() >= -1 and f.max() <= 1
    assert (((f + 1) * 127.5).round() - torch.from_numpy(out).permute(2, 0, 1).float()).abs().max() <= 1
    assert Dg.bsr_degrade_image(u8_hwc, None).shape == u8_hwc.shape  # fresh entropy
    with pytest.raises(ValueError, match="channels_last"):
        Dg.bsr_degrade_image(np.zeros((3, 8, 3), np.uint8))
    no_blur = Dg.BSRConfig(blur_prob=0.0)  # a 7-tap blur needs more than 3 rows
    assert Dg.bsr_degrade_image(np.zeros((3, 8, 3), np.uint8), 0, no_blur, channels_last=True).shape == (3, 8, 3)
    with pytest.raises(ValueError, match="channels"):
        Dg.bsr_degrade_image(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        Dg.bsr_degrade_image(np.zeros((8, 8, 3), np.int32))
