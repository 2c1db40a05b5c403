"""unCLIP upsamplers (paper section 2.1): 64->256 and 256->1024 diffusion models.

Conv-only U-Nets (diffusers `UNet2DModel`, no attention anywhere, mid block included) that see the
noisy high-res image concatenated with the low-res image upsampled to the same size. Because there
is no attention, a model trained on random crops (a quarter of the target side) runs unchanged at
the full size. The low-res conditioning is corrupted in training (Gaussian blur for the first,
BSR for the second; degradations.py), optionally also noised by a random amount whose level the
network is told through diffusers' "timestep" class embedding (noise-conditioning augmentation,
as in cascaded diffusion models). No captions and no guidance, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import nn

from . import degradations, diffusion
from .degradations import downsample_to
from .checkpoint import CheckpointError, migration, register
from .objective import Field, check_batch, detached, unwrap
from .decoder import config_mismatch

BLOCK_TYPES = {  # name -> (down block, up block)
    "plain": ("DownBlock2D", "UpBlock2D"),  # strided conv down, conv up
    "resnet_updown": ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D"),  # BigGAN-style, Karlo's
}


@dataclass
class UpsamplerConfig:
    image_size: int = 256  # target (full) size
    low_res_size: int = 64
    in_channels: int = 3
    block_out_channels: list[int] = field(default_factory=lambda: [320, 640, 960, 1280])
    layers_per_block: int = 3
    block_type: str = "plain"
    resnet_time_scale_shift: str = "scale_shift"
    norm_num_groups: int = 32
    dropout: float = 0.0
    # training corruption of the conditioning image
    degradation: str = "blur"  # "none" | "blur" | "bsr"
    blur_kernel: int = 3
    blur_sigma: float = 0.6
    crop_size: int | None = None  # training crop side; None = image_size // 4 (paper)
    noise_aug_max: float = 0.0  # max conditioning-noise level as a fraction of T; 0 = off
    # diffusion
    prediction_type: str = "epsilon"
    schedule: str = "cosine"  # the paper's last upsampler uses "linear"
    num_train_timesteps: int = 1000

    def __post_init__(self):
        self.block_out_channels = list(self.block_out_channels)
        if self.block_type not in BLOCK_TYPES:
            raise ValueError(f"block_type={self.block_type!r}; allowed: {tuple(BLOCK_TYPES)}")
        if self.degradation not in ("none", "blur", "bsr"):
            raise ValueError(f"degradation={self.degradation!r}; allowed: ('none', 'blur', 'bsr')")
        if self.prediction_type not in diffusion.PREDICTION_TYPES:
            raise ValueError(f"prediction_type={self.prediction_type!r}; allowed: {diffusion.PREDICTION_TYPES}")
        if self.schedule not in diffusion.SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; allowed: {tuple(diffusion.SCHEDULES)}")
        if not 0.0 <= self.noise_aug_max <= 1.0:
            raise ValueError(f"noise_aug_max={self.noise_aug_max} must be in [0, 1]")
        if self.low_res_size >= self.image_size:
            raise ValueError(f"low_res_size={self.low_res_size} must be smaller than image_size={self.image_size}")
        down = 2 ** (len(self.block_out_channels) - 1)
        if self.train_crop % down:
            raise ValueError(f"crop_size={self.train_crop} must be divisible by {down} (the U-Net's downsampling)")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels={self.block_out_channels} must be divisible by norm_num_groups={self.norm_num_groups}")

    @property
    def train_crop(self) -> int:
        return self.crop_size or self.image_size // 4


SIZES: dict[str, UpsamplerConfig] = {
    "tiny": UpsamplerConfig(image_size=32, low_res_size=16, block_out_channels=[16, 32], layers_per_block=1,
                            norm_num_groups=8),
    "small": UpsamplerConfig(image_size=128, low_res_size=32, block_out_channels=[32, 64, 128, 128],
                             layers_per_block=2),
    # Karlo's 64->256 super-res U-Net (~700M per diffusers' conversion config)
    "base": UpsamplerConfig(block_type="resnet_updown"),
    # paper appendix C: 256->1024 300M, linear schedule, BSR conditioning
    "paper": UpsamplerConfig(image_size=1024, low_res_size=256, block_out_channels=[128, 256, 512, 1024],
                             layers_per_block=3, schedule="linear", degradation="bsr", block_type="resnet_updown"),
}


def unet_kwargs(cfg: UpsamplerConfig) -> dict:
    down, up = BLOCK_TYPES[cfg.block_type]
    n = len(cfg.block_out_channels)
    return dict(
        sample_size=cfg.image_size, in_channels=2 * cfg.in_channels, out_channels=cfg.in_channels,
        down_block_types=(down,) * n, up_block_types=(up,) * n, block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups, dropout=cfg.dropout,
        resnet_time_scale_shift=cfg.resnet_time_scale_shift,
        add_attention=False,  # no attention in the mid block either: the model must be size-agnostic
        class_embed_type="timestep" if cfg.noise_aug_max > 0 else None,
    )


def upsample_to(low: torch.Tensor, size: int) -> torch.Tensor:
    """The conditioning image at the target size (bicubic, antialiased; clamped to [-1, 1])."""
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)


@register("upsampler.Upsampler", format_version=2)
class Upsampler(nn.Module):
    config_class = UpsamplerConfig

    def __init__(self, config: UpsamplerConfig):
        super().__init__()
        self.config = config
        self.unet = UNet2DModel(**unet_kwargs(config))
        self.training_scheduler = self.scheduler("ddpm")  # q(x_t | x0) for the objective and the augmentation

    def forward(self, x_t, t, cond_up, aug_level=None):
        """x_t and cond_up (the upsampled low-res image) at the same, any, size; aug_level: (B,)
        integer noise level of cond_up (only with noise_aug_max > 0)."""
        if x_t.shape != cond_up.shape:
            raise ValueError(f"x_t {tuple(x_t.shape)} and cond_up {tuple(cond_up.shape)} must have the same shape")
        if self.config.noise_aug_max > 0:
            aug_level = torch.zeros_like(t) if aug_level is None else aug_level
        elif aug_level is not None:
            raise ValueError("aug_level given but noise_aug_max == 0 (the model has no noise-level input)")
        return self.unet(torch.cat([x_t, cond_up], dim=1), t, class_labels=aug_level).sample

    def scheduler(self, sampler: str):
        """A fresh scheduler to sample with ("ddpm", "ddim"; diffusers' are stateful)."""
        cfg = self.config
        return diffusion.make_scheduler(sampler, schedule=cfg.schedule, prediction_type=cfg.prediction_type,
                                        num_train_timesteps=cfg.num_train_timesteps, clip_sample=1.0)

    def condition(self, low: torch.Tensor, generator: torch.Generator | None = None, corrupt: bool = True):
        """Low-res image -> (corrupted) conditioning at the target size."""
        cfg = self.config
        if corrupt:
            low = degradations.degrade(low, cfg.degradation, generator, blur_kernel=cfg.blur_kernel, blur_sigma=cfg.blur_sigma)
        return upsample_to(low, cfg.image_size)

    def _augment(self, cond, generator, level: int):
        """Noise-conditioning augmentation at sampling time: q(cond_s | cond) at level s; returns (cond_s, s)."""
        s = torch.full((cond.shape[0],), int(level), dtype=torch.long, device=cond.device)
        noise = diffusion.randn(cond.shape, generator, device=cond.device, dtype=cond.dtype)
        return diffusion.add_noise(self.training_scheduler, cond, noise, s), s

    @torch.no_grad()
    def sample(self, low: torch.Tensor, *, steps: int = 27, sampler: str = "ddim", eta: float = 0.0,
               generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
               size: int | None = None, aug_level: int = 0) -> torch.Tensor:
        """Upsample `low` (B, C, h, w) in [-1, 1] to `size` (default image_size; any multiple of
        the U-Net's downsampling works: it has no attention). aug_level: the conditioning noise
        level to apply and announce (noise_aug_max > 0 only)."""
        cfg = self.config
        size = size or cfg.image_size
        cond = upsample_to(low, size)
        cond, s = self._augment(cond, generator, aug_level) if cfg.noise_aug_max > 0 else (cond, None)
        if x_T is None:
            x_T = diffusion.randn(cond.shape, generator, device=low.device, dtype=low.dtype)
        fn = lambda x, t, conditional=True: self(x, t, cond, s)
        x = diffusion.sample(fn, self.scheduler(sampler), x_T, steps, eta=eta, generator=generator)
        return x.clamp(-1, 1)

    @classmethod
    def from_diffusers(cls, unet_dir: str | Path, **overrides) -> "Upsampler":
        """Build from a `save_pretrained` UNet2DModel directory (e.g. Karlo's `super_res_first/`).
        `overrides` set fields diffusers does not store (low_res_size, degradation, schedule...)."""
        unet = UNet2DModel.from_pretrained(str(unet_dir), low_cpu_mem_usage=False)
        uc = unet.config
        kinds = {v: k for k, v in BLOCK_TYPES.items()}
        pair = (uc.down_block_types[0], uc.up_block_types[0])
        if pair not in kinds or len(set(uc.down_block_types)) != 1 or len(set(uc.up_block_types)) != 1:
            raise CheckpointError(f"{unet_dir}: block types {uc.down_block_types}/{uc.up_block_types} are not conv-only blocks of one kind {list(BLOCK_TYPES.values())}")
        if uc.add_attention:
            raise CheckpointError(f"{unet_dir}: add_attention=True; the upsamplers have no attention")
        if uc.in_channels != 2 * uc.out_channels:
            raise CheckpointError(f"{unet_dir}: in_channels={uc.in_channels} must be 2 x out_channels={uc.out_channels}")
        fields = dict(image_size=uc.sample_size, low_res_size=uc.sample_size // 4, in_channels=uc.out_channels,
                      block_out_channels=list(uc.block_out_channels), layers_per_block=uc.layers_per_block,
                      block_type=kinds[pair], resnet_time_scale_shift=uc.resnet_time_scale_shift,
                      norm_num_groups=uc.norm_num_groups)
        if uc.class_embed_type == "timestep":
            fields["noise_aug_max"] = 0.25
        elif uc.class_embed_type is not None:
            raise CheckpointError(f"{unet_dir}: class_embed_type={uc.class_embed_type!r}; expected None or 'timestep'")
        fields.update(overrides)
        model = cls(UpsamplerConfig(**fields))
        bad = config_mismatch(model.unet.config, uc)
        if bad:
            raise CheckpointError(f"{unet_dir}: this upsampler cannot represent the UNet's " + ", ".join(
                f"{k}={theirs!r} (ours: {ours!r})" for k, theirs, ours in bad))
        model.unet.load_state_dict(unet.state_dict())
        return model


@migration("upsampler.Upsampler", from_version=1)
def _noise_aug_bool_to_level(config: dict) -> dict:
    """Format 1 (this module's first draft) had `noise_aug: bool` with a fixed maximum level of
    0.25 T; format 2 stores the maximum level itself (`noise_aug_max`, 0 = off)."""
    config = dict(config)
    config["noise_aug_max"] = 0.25 if config.pop("noise_aug", False) else 0.0
    return config


# -- training objective (models.objective) -------------------------------------------------------

BATCH: dict[str, Field] = {
    "image": Field("float", ("B", "C", "H", "W"), doc="target images in [-1, 1] at image_size"),
    "low": Field("float", ("B", "C", "h", "w"), optional=True,
                 doc="conditioning images at low_res_size as the data path made them (already degraded: used "
                     "as given); absent: the image downsampled, then degraded here per the config"),
    "crop": Field("long", ("B", 2), optional=True, doc="(top, left) of each training crop, in [0, image_size - crop]"),
    "t": Field("long", ("B",), optional=True, doc="diffusion timesteps in [0, T)"),
    "noise": Field("float", ("B", "C", "crop", "crop"), optional=True, doc="Gaussian noise of q(x_t | x0) on the crop"),
    "aug_level": Field("long", ("B",), optional=True, doc="conditioning noise levels (noise_aug_max > 0 only)"),
    "aug_noise": Field("float", ("B", "C", "crop", "crop"), optional=True, doc="Gaussian noise of the conditioning augmentation"),
}


def crop_windows(x: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """x[i, :, y_i:y_i + size, x_i:x_i + size] for corners [B, 2] = (y, x), by index arithmetic on
    the device (no host sync)."""
    steps = torch.arange(size, device=x.device)
    rows = (corners[:, 0, None] + steps)[:, :, None]  # [B, size, 1]
    cols = (corners[:, 1, None] + steps)[:, None, :]  # [B, 1, size]
    batch = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return x[batch, :, rows, cols].permute(0, 3, 1, 2)  # advanced indices first: [B, size, size, C]


def training_loss(network: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None):
    """Regress the configured target on random crops (train_crop, a quarter of the side): the
    conditioning (batch["low"], or the image downsampled and degraded here) is upsampled to the
    image size, the same window is cut from it and from the target, and with noise_aug_max > 0 it
    is noised to a random level the network is told. Crops, t, noise and the augmentation are
    drawn unless the batch has them. Metrics: loss, mse."""
    check_batch(BATCH, batch, "upsampler")
    model = unwrap(network)
    cfg = model.config
    hi = batch["image"]
    B, dev = hi.shape[0], hi.device
    if hi.shape[-2:] != (cfg.image_size, cfg.image_size):
        raise ValueError(f"upsampler batch['image'] has size {tuple(hi.shape[-2:])}, expected image_size={cfg.image_size}")
    if "low" in batch:
        cond = upsample_to(batch["low"], cfg.image_size)
    else:
        cond = model.condition(downsample_to(hi, cfg.low_res_size), generator)
    c, gen_dev = cfg.train_crop, (generator.device if generator is not None else "cpu")
    sched = model.training_scheduler
    if "crop" in batch:
        corners = batch["crop"]
    else:
        corners = torch.randint(0, cfg.image_size - c + 1, (B, 2), generator=generator, device=gen_dev).to(dev)
    hi, cond = crop_windows(hi, corners, c), crop_windows(cond, corners, c)
    s = None
    if cfg.noise_aug_max > 0:  # noise-conditioning augmentation: q(cond_s | cond) at a random level s
        max_level = int(cfg.noise_aug_max * (cfg.num_train_timesteps - 1))
        if "aug_level" in batch:
            s = batch["aug_level"]
        else:
            s = torch.randint(0, max_level + 1, (B,), generator=generator, device=gen_dev).to(dev)
        aug = batch["aug_noise"] if "aug_noise" in batch else diffusion.randn(cond.shape, generator, device=dev, dtype=cond.dtype)
        cond = diffusion.add_noise(sched, cond, aug, s)
    t = batch["t"] if "t" in batch else diffusion.sample_timesteps(B, sched, generator, device=dev)
    noise = batch["noise"] if "noise" in batch else diffusion.randn(hi.shape, generator, device=dev, dtype=hi.dtype)
    out = network(diffusion.add_noise(sched, hi, noise, t), t, cond, s).float()
    mse = F.mse_loss(out, diffusion.training_target(sched, hi, noise, t).float())
    return mse, detached(loss=mse, mse=mse)
