"""unCLIP decoder (paper section 2.1): a U-Net at the base resolution conditioned on the CLIP image
embedding z_i and, optionally, the caption.

Built on diffusers' `UNet2DConditionModel` in Karlo's configuration (ResNet blocks at high
resolution, `SimpleCrossAttn*` blocks where attention is wanted, `class_embed_type="identity"` to
take an additive embedding), so Karlo-style `save_pretrained` weights load (`from_diffusers`).
For `SimpleCrossAttn*` blocks diffusers' `attention_head_dim` really is the width of a head
(heads = channels // attention_head_dim); attention is placed only at the resolutions named in
`attention_resolutions` because attention at high resolution is what makes a U-Net slow on CPU.

Conditioning (`TextProj`, parameter names identical to diffusers' `UnCLIPTextProjModel`):
z_i (and z_t) are projected and added to the timestep embedding, and z_i is projected into 4 extra
context tokens placed next to the projected caption token states (before them, as diffusers does;
the cross-attention has no positions, so "appended" in the paper is the same thing). Classifier-free guidance:
in training z_i is replaced by a learned null embedding with p=0.1 and the caption (z_t and token
states) by learned null embeddings with p=0.5, independently.

The network (`unet`, `text_proj`) is separate from the denoiser wrapper (`model_fn`) that the
samplers in diffusion.py call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from safetensors.torch import load_file
from torch import nn

from . import diffusion
from .checkpoint import CheckpointError, migration, register
from .diffusers_blocks import (WRITTEN_FOR, UnexpectedDiffusersBlock, equals, expect_block, is_conv, is_none_or, is_type,
                               parameter_names)
from .objective import Field, bernoulli, check_batch, detached, unwrap


@dataclass
class DecoderConfig:
    image_size: int = 64
    in_channels: int = 3
    # pixels per side folded into channels before the U-Net (space-to-depth) and unfolded after it:
    # the U-Net runs at image_size / patch_size on in_channels * patch_size**2 channels, p**2 times
    # fewer positions for each convolution (as DiT's patches; 1: plain pixels, Karlo's)
    patch_size: int = 1
    block_out_channels: list[int] = field(default_factory=lambda: [320, 640, 960, 1280])
    layers_per_block: int = 3
    attention_resolutions: list[int] = field(default_factory=lambda: [32, 16, 8])
    attention_head_dim: int = 64  # width of one head (SimpleCrossAttn blocks)
    norm_num_groups: int = 32
    dropout: float = 0.0
    embed_dim: int = 768  # z_i / z_t width
    text_dim: int = 768  # caption token-state width
    cross_attention_dim: int = 1536
    clip_extra_context_tokens: int = 4
    # classifier-free guidance dropout (paper: 10% image embedding, 50% caption)
    image_drop_prob: float = 0.1
    text_drop_prob: float = 0.5
    # tokens of the null caption (a dropped or absent caption): 1 learned token by default; an
    # encoded empty caption (Karlo's unconditional branch, `set_null_condition`) has its own count
    null_text_len: int = 1
    # diffusion
    prediction_type: str = "epsilon"  # "epsilon" | "sample" | "v_prediction"
    schedule: str = "cosine"
    num_train_timesteps: int = 1000
    # Min-SNR-gamma loss weighting (Hang et al. 2023; None: the plain MSE on the target)
    min_snr_gamma: float | None = None
    # training timesteps logit-normal in t / T around sigmoid(mean) (None: uniform): more of the steps
    # at the noise levels where a small shape's outline forms
    timestep_logit_mean: float | None = None
    timestep_logit_std: float = 1.0
    learned_variance: bool = False  # off by default: the first NaN source under AMP
    vlb_weight: float = 0.001  # Improved DDPM's lambda on L_vlb (summed over t, bits/dim); learned variance only

    def __post_init__(self):
        self.block_out_channels = list(self.block_out_channels)
        self.attention_resolutions = list(self.attention_resolutions)
        if self.patch_size < 1 or self.image_size % (self.patch_size * 2 ** (len(self.block_out_channels) - 1)):
            raise ValueError(f"image_size={self.image_size} must be divisible by patch_size={self.patch_size} times "
                             "2**(len(block_out_channels)-1)")
        res = self.block_resolutions()
        bad = [r for r in self.attention_resolutions if r not in res]
        if bad:
            raise ValueError(f"attention_resolutions={self.attention_resolutions}: {bad} not among the U-Net's block resolutions {res}")
        for c, r in zip(self.block_out_channels, res):
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels={self.block_out_channels} must be divisible by norm_num_groups={self.norm_num_groups}")
            # attention blocks, and the mid block at the lowest resolution, split channels into heads
            if (r in self.attention_resolutions or r == res[-1]) and c % self.attention_head_dim:
                raise ValueError(f"block_out_channels={self.block_out_channels} must be divisible by attention_head_dim={self.attention_head_dim}")
        if self.prediction_type not in diffusion.PREDICTION_TYPES:
            raise ValueError(f"prediction_type={self.prediction_type!r}; allowed: {diffusion.PREDICTION_TYPES}")
        if self.schedule not in diffusion.SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; allowed: {tuple(diffusion.SCHEDULES)}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma={self.min_snr_gamma} must be > 0 (or None: no weighting)")
        if self.timestep_logit_std <= 0:
            raise ValueError(f"timestep_logit_std={self.timestep_logit_std} must be > 0")
        if self.null_text_len < 1:
            raise ValueError(f"null_text_len={self.null_text_len} must be >= 1")
        for name in ("image_drop_prob", "text_drop_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")

    def block_resolutions(self) -> list[int]:
        """The U-Net's resolution at each level (after folding patches into channels)."""
        return [self.image_size // self.patch_size // 2**i for i in range(len(self.block_out_channels))]

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]  # diffusers' default; the identity class input must match it


SIZES: dict[str, DecoderConfig] = {
    # CPU seconds: tests and demo
    "tiny": DecoderConfig(image_size=32, block_out_channels=[32, 64], layers_per_block=1, attention_resolutions=[16],
                          attention_head_dim=32, norm_num_groups=8, embed_dim=64, text_dim=64, cross_attention_dim=64),
    # the 64-px demo decoder (attention only at 16x16 / 8x8). Width kept low at 64 and 32 px and spent
    # at 16 and 8 px (multipliers 1,1,2,4, as ADM's larger-image models start), 3 ResNet blocks per
    # level as ADM/GLIDE/Karlo at 64 px: ~29M params like the former [64,128,192,256] x 2 blocks in
    # ~23% fewer FLOPs per sample, since high-resolution convolution is where a U-Net's time goes.
    "small": DecoderConfig(image_size=64, block_out_channels=[64, 64, 128, 256], layers_per_block=3,
                           attention_resolutions=[16, 8], attention_head_dim=32, embed_dim=512, text_dim=512,
                           cross_attention_dim=512),
    # Karlo's decoder (~900M): diffusers' conversion config
    "base": DecoderConfig(),
    # paper appendix C: 3.5B GLIDE-style decoder, 2048-wide text encoder, learned variance
    "paper": DecoderConfig(block_out_channels=[512, 1024, 1536, 2048], embed_dim=1024, text_dim=2048,
                           cross_attention_dim=2048, learned_variance=True),
}

# UNet2DConditionModel settings fixed by this design (Karlo's); from_diffusers checks every key.
_FIXED_UNET = dict(
    class_embed_type="identity", resnet_time_scale_shift="scale_shift", mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    flip_sin_to_cos=True, freq_shift=0, act_fn="silu", norm_eps=1e-5, downsample_padding=1, mid_block_scale_factor=1,
    only_cross_attention=False, addition_embed_type=None, encoder_hid_dim=None, time_embedding_type="positional",
)


def config_mismatch(ours, theirs) -> list[tuple[str, object, object]]:
    """Keys where two diffusers model configs differ (private keys ignored): loading weights into
    a differently configured module could succeed and still compute something else."""
    norm = lambda k, v: any(v) if k == "only_cross_attention" and isinstance(v, (list, tuple)) else json.loads(json.dumps(v))
    keys = sorted(k for k in set(ours) | set(theirs) if not k.startswith("_"))
    return [(k, theirs.get(k), ours.get(k)) for k in keys if norm(k, ours.get(k)) != norm(k, theirs.get(k))]


def unet_kwargs(cfg: DecoderConfig) -> dict:
    attn = [r in cfg.attention_resolutions for r in cfg.block_resolutions()]
    down = ["SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attn]
    up = ["SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attn)]
    return dict(
        sample_size=cfg.image_size // cfg.patch_size, in_channels=cfg.in_channels * cfg.patch_size**2,
        out_channels=cfg.in_channels * (2 if cfg.learned_variance else 1) * cfg.patch_size**2,
        down_block_types=tuple(down), up_block_types=tuple(up), block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block, attention_head_dim=cfg.attention_head_dim,
        cross_attention_dim=cfg.cross_attention_dim, norm_num_groups=cfg.norm_num_groups, dropout=cfg.dropout,
        **_FIXED_UNET,
    )


# -- faster execution of diffusers' blocks (same parameters, same function) ---------------------
# Profile of a small-decoder training step (64 px, batch 8, 1 CPU thread): ~75% is convolution,
# already near the core's peak FLOP rate in oneDNN, so the gains come from doing fewer FLOPs and
# fewer full-tensor elementwise passes, not from faster kernels (channels_last made conv backward
# ~2x slower on this AVX2 CPU, so the U-Net stays NCHW).

# Nearest 2x upsampling then a 3x3 conv == four 2x2 convs on the low-resolution input, one per
# output phase (sub-pixel convolution): phase 0 of a row reads low rows (i-1, i) with kernel rows
# (w0, w1+w2), phase 1 reads (i, i+1) with (w0+w1, w2). _PHASE[a] maps 3 kernel taps to 2.
_PHASE = torch.tensor([[[1.0, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]])


def upsample_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1) in 4/9 of the
    FLOPs and without materialising the upsampled input."""
    B, _, H, W = x.shape
    O = weight.shape[0]
    R = _PHASE.to(weight)
    # (O, a, b, I, 2, 2): the four phase kernels as one conv with 4*O outputs (pixel-shuffle order)
    k = torch.einsum("apk,bql,oikl->oabipq", R, R, weight).reshape(4 * O, weight.shape[1], 2, 2)
    y = F.conv2d(x, k, None if bias is None else bias.repeat_interleave(4), padding=1)  # (B, 4O, H+1, W+1)
    y = y.view(B, O, 2, 2, H + 1, W + 1)
    # phase (a, b) of low-res pixel (i, j) is conv output (i + a, j + b)
    rows = [torch.stack([y[:, :, a, b, a:a + H, b:b + W] for b in (0, 1)], dim=-1) for a in (0, 1)]
    return torch.stack(rows, dim=3).view(B, O, 2 * H, 2 * W)


class _ResnetBlock(ResnetBlock2D):
    """diffusers' ResnetBlock2D in this design's settings (scale-shift time embedding, nearest/avg-pool
    resampling, output scale 1), computed with less work. Installed by swapping the class of
    diffusers' blocks (`fast_blocks`), so parameter names, save_pretrained and loading are unchanged."""

    # what forward relies on: diffusers_blocks.expect_block refuses any other block
    CHECKS = {
        "time_embedding_norm": equals("scale_shift"),
        "output_scale_factor": equals(1.0),
        "skip_time_act": equals(False),
        "norm1": lambda m: type(m) is nn.GroupNorm and m.affine,
        "norm2": lambda m: type(m) is nn.GroupNorm and m.affine,
        "conv1": is_conv(3),
        "conv2": is_conv(3),
        "time_emb_proj": is_type(nn.Linear),
        "nonlinearity": is_type(nn.SiLU),
        "dropout": is_type(nn.Dropout),
        "conv_shortcut": is_none_or(is_conv(1)),
        "upsample": is_none_or(lambda m: type(m) is Upsample2D and not m.use_conv and not m.use_conv_transpose
                               and m.norm is None and m.interpolate),
        "downsample": is_none_or(lambda m: type(m) is Downsample2D and not m.use_conv and m.norm is None),
    }
    CHILDREN = {"norm1", "conv1", "time_emb_proj", "norm2", "dropout", "conv2", "nonlinearity", "upsample",
                "downsample", "conv_shortcut"}

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = input_tensor
        h = F.silu(self.norm1(x))
        if self.upsample is not None:
            h = upsample_conv3x3(h, self.conv1.weight, self.conv1.bias)
        else:
            if self.downsample is not None:
                x, h = self.downsample(x), self.downsample(h)
            h = self.conv1(h)
        scale, shift = self.time_emb_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        # norm2's affine folded into the time scale/shift: one elementwise pass instead of three
        n2 = self.norm2
        scale = 1 + scale
        h = F.group_norm(h, n2.num_groups, eps=n2.eps)
        h = torch.addcmul(n2.bias[:, None, None] * scale + shift, h, n2.weight[:, None, None] * scale)
        h = self.conv2(self.dropout(F.silu(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)  # 1x1: commutes with nearest upsampling, so done before it
        if self.upsample is not None:
            # the skip path's nearest upsampling as a broadcast in the residual add
            B, C, H, W = x.shape
            return (h.view(B, C, H, 2, W, 2) + x[:, :, :, None, :, None]).view(B, C, 2 * H, 2 * W)
        return x + h  # diffusers divides by output_scale_factor, 1 here


def fast_blocks(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Replace every ResnetBlock2D of `unet` by `_ResnetBlock` (in place, by swapping the class).
    All or nothing: a block that is not the one `_ResnetBlock` was written for raises
    UnexpectedDiffusersBlock (with the installed diffusers version), before any block is swapped."""
    blocks = [(name, m) for name, m in unet.named_modules() if isinstance(m, ResnetBlock2D)]
    if not blocks:
        raise UnexpectedDiffusersBlock(f"models.decoder.fast_blocks found no ResnetBlock2D in the U-Net (diffusers {diffusers.__version__})")
    if parameter_names(ResnetBlock2D.forward)[:3] != ["self", "input_tensor", "temb"]:
        raise UnexpectedDiffusersBlock(
            f"diffusers {diffusers.__version__}'s ResnetBlock2D.forward takes {parameter_names(ResnetBlock2D.forward)}; "
            f"models.decoder._ResnetBlock was written for (self, input_tensor, temb) (diffusers {WRITTEN_FOR})")
    for name, m in blocks:
        if type(m) not in (ResnetBlock2D, _ResnetBlock):
            raise UnexpectedDiffusersBlock(f"unet.{name} is a {type(m).__name__}, a subclass of ResnetBlock2D that "
                                           "models.decoder.fast_blocks does not know")
        expect_block(m, f"unet.{name}", "models.decoder._ResnetBlock", _ResnetBlock.CHECKS, _ResnetBlock.CHILDREN)
    for _, m in blocks:
        m.__class__ = _ResnetBlock
    return unet


class TextProj(nn.Module):
    """CLIP conditioning of the decoder. Same parameter names and layout as diffusers'
    `UnCLIPTextProjModel`, so its weights load; `text_dim` may differ from `embed_dim` here."""

    def __init__(self, embed_dim: int, time_embed_dim: int, cross_attention_dim: int,
                 clip_extra_context_tokens: int = 4, text_dim: int | None = None):
        super().__init__()
        self.clip_extra_context_tokens = clip_extra_context_tokens
        # diffusers' null image embedding for classifier-free guidance
        self.learned_classifier_free_guidance_embeddings = nn.Parameter(torch.zeros(embed_dim))
        self.embedding_proj = nn.Linear(embed_dim, time_embed_dim)  # z_t -> time embedding
        self.clip_image_embeddings_project_to_time_embeddings = nn.Linear(embed_dim, time_embed_dim)
        self.clip_extra_context_tokens_proj = nn.Linear(embed_dim, clip_extra_context_tokens * cross_attention_dim)
        self.encoder_hidden_states_proj = nn.Linear(text_dim or embed_dim, cross_attention_dim)
        self.text_encoder_hidden_states_norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, text_states: torch.Tensor):
        """-> (context tokens (B, extra + L, cross_dim), additive time embedding (B, time_dim))."""
        B = image_emb.shape[0]
        time_add = self.clip_image_embeddings_project_to_time_embeddings(image_emb) + self.embedding_proj(text_emb)
        # diffusers' layout: (B, cross*extra) viewed as (B, cross, extra) then transposed
        extra = self.clip_extra_context_tokens_proj(image_emb).reshape(B, -1, self.clip_extra_context_tokens).permute(0, 2, 1)
        states = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(text_states))
        return torch.cat([extra, states], dim=1), time_add


def _null_states_as_tokens(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before null_text_len existed hold the one null token as (text_dim,)."""
    key = prefix + "null_text_states"
    if key in state_dict and state_dict[key].dim() == 1:
        state_dict[key] = state_dict[key][None]


def _where(drop: torch.Tensor, null: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Rows of `value` where drop is False, the null embedding (broadcast) where it is True."""
    drop = drop.view(-1, *[1] * (value.dim() - 1))
    return torch.where(drop, null.to(value.dtype).expand_as(value), value)


@register("decoder.Decoder", format_version=2)
class Decoder(nn.Module):
    config_class = DecoderConfig

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.unet = fast_blocks(UNet2DConditionModel(**unet_kwargs(config)))
        self.text_proj = TextProj(config.embed_dim, config.time_embed_dim, config.cross_attention_dim,
                                  config.clip_extra_context_tokens, config.text_dim)
        # learned null caption (diffusers' text_proj has only the null image embedding)
        self.null_text_emb = nn.Parameter(torch.zeros(config.embed_dim))
        self.null_text_states = nn.Parameter(torch.zeros(config.null_text_len, config.text_dim))
        self.register_load_state_dict_pre_hook(_null_states_as_tokens)
        self.training_scheduler = self.scheduler("ddpm")  # q(x_t | x0) for the objective

    # -- network ---------------------------------------------------------------------------------

    def forward(self, x, t, image_emb, text_emb=None, text_states=None, text_mask=None, drop_image=None, drop_text=None):
        """Network prediction (B, C or 2C with learned variance, H, W).

        image_emb/text_emb: (B, embed_dim); text_states: (B, L, text_dim) with optional bool text_mask
        (B, L), True = real token. A missing caption means the null caption. drop_image/drop_text:
        bool (B,) rows to replace by the null image embedding / null caption (classifier-free
        guidance): learned, or Karlo's encoded empty caption after `set_null_condition`.
        """
        cfg = self.config
        B = x.shape[0]
        if image_emb.shape != (B, cfg.embed_dim):
            raise ValueError(f"image_emb has shape {tuple(image_emb.shape)}, expected {(B, cfg.embed_dim)}")
        if text_emb is None and text_states is None:
            drop_text = None  # no caption: the null caption, all of it visible
        if text_emb is None:
            text_emb = self.null_text_emb.expand(B, -1)
        if text_states is None:
            text_states, text_mask = self.null_text_states.expand(B, -1, -1), None
        if text_emb.shape != (B, cfg.embed_dim):
            raise ValueError(f"text_emb has shape {tuple(text_emb.shape)}, expected {(B, cfg.embed_dim)}")
        if text_states.dim() != 3 or text_states.shape[0] != B or text_states.shape[2] != cfg.text_dim:
            raise ValueError(f"text_states has shape {tuple(text_states.shape)}, expected (B={B}, L, text_dim={cfg.text_dim})")
        if drop_image is not None:
            image_emb = _where(drop_image, self.text_proj.learned_classifier_free_guidance_embeddings, image_emb)
        if drop_text is not None:
            # a dropped caption is the null caption with only its own tokens visible, whatever the
            # batch's caption length, so the unconditional branch is decoding with no caption at all
            n = cfg.null_text_len
            L = max(text_states.shape[1], n)
            keep = torch.ones(B, text_states.shape[1], dtype=torch.bool, device=x.device) if text_mask is None else text_mask.bool()
            text_states, keep = F.pad(text_states, (0, 0, 0, L - text_states.shape[1])), F.pad(keep, (0, L - keep.shape[1]))
            null_states = F.pad(self.null_text_states.to(text_states.dtype), (0, 0, 0, L - n))
            text_emb = _where(drop_text, self.null_text_emb, text_emb)
            text_states = _where(drop_text, null_states, text_states)
            text_mask = torch.where(drop_text.view(-1, 1), (torch.arange(L, device=x.device) < n).expand(B, L), keep)
        context, time_add = self.text_proj(image_emb, text_emb, text_states)
        mask = None
        if text_mask is not None:
            if text_mask.shape != text_states.shape[:2]:
                raise ValueError(f"text_mask has shape {tuple(text_mask.shape)}, expected {tuple(text_states.shape[:2])}")
            mask = F.pad(text_mask.bool(), (cfg.clip_extra_context_tokens, 0), value=True)
            if mask.shape[1] in {r * r for r in cfg.block_resolutions()}:
                # diffusers' added-KV attention extends the mask over the image's own keys only when
                # the context is not as long as the image (H*W): one more masked token keeps them apart
                context, mask = F.pad(context, (0, 0, 0, 1)), F.pad(mask, (0, 1), value=False)
        p = cfg.patch_size
        if p > 1:
            x = F.pixel_unshuffle(x, p)
        out = self.unet(x, t, encoder_hidden_states=context, class_labels=time_add, attention_mask=mask).sample
        return F.pixel_shuffle(out, p) if p > 1 else out

    @torch.no_grad()
    def set_null_condition(self, text_emb: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor | None = None):
        """Make the null caption an encoded empty caption (z_t (embed_dim,), token states (L,
        text_dim), mask (L,)): Karlo's unconditional branch, which uses the empty caption's
        encoding, not learned nulls. Its visible tokens become the null caption's tokens (the
        parameter is re-made when their count changes: call this before building an optimizer)."""
        states = text_states.reshape(-1, self.config.text_dim)
        if text_mask is not None:
            mask = text_mask.reshape(-1).bool()
            n = int(mask.sum())
            if n < 1 or not bool(mask[:n].all()):
                raise ValueError("text_mask must mark a non-empty prefix of the tokens (e.g. start and end token)")
            states = states[:n]
        param = self.null_text_states
        if states.shape != param.shape:
            self.null_text_states = nn.Parameter(param.new_empty(states.shape))
            self.config = replace(self.config, null_text_len=states.shape[0])
        self.null_text_states.copy_(states)
        self.null_text_emb.copy_(text_emb.reshape(-1))

    # -- schedulers ------------------------------------------------------------------------------

    def scheduler(self, sampler: str, clip_sample: float | None = 1.0):
        """A fresh scheduler to sample with ("ddpm", "ddim", "ddim_inverse"; diffusers' are stateful)."""
        cfg = self.config
        return diffusion.make_scheduler(sampler, schedule=cfg.schedule, prediction_type=cfg.prediction_type,
                                        num_train_timesteps=cfg.num_train_timesteps, clip_sample=clip_sample,
                                        learned_variance=cfg.learned_variance)

    @staticmethod
    def _vlb(sched, out, x0, x_t, t):
        """L_vlb = sum over all T timesteps of L_t, in bits per dimension, estimated as T times the
        batch mean of L_t at the uniformly drawn t (diffusion.vlb_terms: the variance head learns
        from it, the mean is stopped). vlb_weight (Improved DDPM's lambda = 0.001) multiplies this,
        so the hybrid loss is Improved DDPM's L_simple + lambda L_vlb in its units."""
        return sched.config.num_train_timesteps * diffusion.vlb_terms(sched, out, x0, x_t, t).mean()

    # -- sampling --------------------------------------------------------------------------------

    def model_fn(self, image_emb, text_emb=None, text_states=None, text_mask=None) -> diffusion.ModelFn:
        """The denoiser the samplers call: conditional = given z_i and caption; unconditional =
        learned null z_i and null caption (both dropped, as in Karlo)."""
        B = image_emb.shape[0]
        ones = torch.ones(B, dtype=torch.bool, device=image_emb.device)

        stacked: dict[int, list] = {}  # the conditions repeated k times, made once per sampling chain

        def fn(x, t, conditional=True):
            if isinstance(conditional, torch.Tensor):  # x stacks copies of the B conditions' rows
                k = x.shape[0] // B
                if k not in stacked:
                    stacked[k] = [None if v is None else v.repeat(k, *[1] * (v.dim() - 1))
                                  for v in (image_emb, text_emb, text_states, text_mask)]
                return self(x, t, *stacked[k], drop_image=~conditional, drop_text=~conditional)
            if conditional:
                return self(x, t, image_emb, text_emb, text_states, text_mask)
            return self(x, t, image_emb, text_emb, text_states, text_mask, drop_image=ones, drop_text=ones)

        fn.takes_row_mask = True
        return fn

    @torch.no_grad()
    def sample(self, image_emb, text_emb=None, text_states=None, text_mask=None, *, steps: int = 50,
               sampler: str = "ddim", eta: float = 0.0, guidance_scale: float = 1.0,
               generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
               clip_sample: float | None = 1.0) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1]. x_T: start noise (section 3's bipartite latent);
        drawn from `generator` if absent. clip_sample: clamp each step's predicted x0 to
        [-c, c]; None when decoding an inverted x_T exactly (inversion does not clip)."""
        cfg = self.config
        if x_T is None:
            shape = (image_emb.shape[0], cfg.in_channels, cfg.image_size, cfg.image_size)
            x_T = diffusion.randn(shape, generator, device=image_emb.device, dtype=image_emb.dtype)
        fn = self.model_fn(image_emb, text_emb, text_states, text_mask)
        x = diffusion.sample(fn, self.scheduler(sampler, clip_sample), x_T, steps, eta=eta, generator=generator,
                             guidance_scale=guidance_scale)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def invert(self, x0, image_emb, text_emb=None, text_states=None, text_mask=None, *, steps: int = 50,
               guidance_scale: float = 1.0) -> torch.Tensor:
        """DDIM inversion x0 -> x_T conditioned on z_i (and caption); `sample(..., x_T=x_T, eta=0,
        steps=steps, clip_sample=None)` reconstructs x0 (same guidance_scale)."""
        fn = self.model_fn(image_emb, text_emb, text_states, text_mask)
        return diffusion.ddim_invert(fn, self.scheduler("ddim_inverse"), x0, steps, guidance_scale=guidance_scale)

    # -- diffusers interop -----------------------------------------------------------------------

    @classmethod
    def from_diffusers(cls, unet_dir: str | Path, text_proj_dir: str | Path | None = None, **overrides) -> "Decoder":
        """Build from a `save_pretrained` UNet2DConditionModel directory (e.g. Karlo's `decoder/`)
        and, optionally, the matching `text_proj/` directory. `overrides` set DecoderConfig fields
        that diffusers does not store (embed_dim, text_dim when there is no text_proj, dropout rates...).
        The null caption is not in diffusers and starts at zero; to reproduce Karlo's unconditional
        branch (UnCLIPPipeline: the empty caption's encoding) call `set_null_condition` with the
        text encoder's unnormalised encoding of "" (models.unclip.UnCLIP.use_empty_caption_as_null)."""
        unet = UNet2DConditionModel.from_pretrained(str(unet_dir), low_cpu_mem_usage=False)
        uc = unet.config
        n = len(uc.block_out_channels)
        res = [uc.sample_size // 2**i for i in range(n)]
        attn = [r for r, b in zip(res, uc.down_block_types) if b.startswith("SimpleCrossAttn")]
        fields = dict(image_size=uc.sample_size, in_channels=uc.in_channels, block_out_channels=list(uc.block_out_channels),
                      layers_per_block=uc.layers_per_block, attention_resolutions=attn,
                      attention_head_dim=uc.attention_head_dim, norm_num_groups=uc.norm_num_groups,
                      cross_attention_dim=uc.cross_attention_dim, learned_variance=uc.out_channels == 2 * uc.in_channels)
        if text_proj_dir is not None:
            tp = json.loads((Path(text_proj_dir) / "config.json").read_text())
            fields.update(embed_dim=tp["clip_embeddings_dim"], clip_extra_context_tokens=tp["clip_extra_context_tokens"])
            fields.setdefault("text_dim", tp["clip_embeddings_dim"])
        fields.update(overrides)
        model = cls(DecoderConfig(**fields))
        bad = config_mismatch(model.unet.config, uc)
        if bad:
            raise CheckpointError(f"{unet_dir}: this decoder cannot represent the UNet's " + ", ".join(
                f"{k}={theirs!r} (ours: {ours!r})" for k, theirs, ours in bad))
        model.unet.load_state_dict(unet.state_dict())
        if text_proj_dir is not None:
            model.text_proj.load_state_dict(load_file(str(Path(text_proj_dir) / "diffusion_pytorch_model.safetensors")))
        return model


# -- training objective (models.objective) -------------------------------------------------------

BATCH: dict[str, Field] = {
    "image": Field("float", ("B", "C", "H", "W"), doc="images in [-1, 1] at image_size"),
    "image_emb": Field("float", ("B", "embed_dim"), doc="CLIP image embedding z_i"),
    "text_emb": Field("float", ("B", "embed_dim"), optional=True, doc="CLIP text embedding z_t; absent: no caption"),
    "text_states": Field("float", ("B", "L", "text_dim"), optional=True, doc="caption token states; absent: no caption"),
    "text_mask": Field("bool", ("B", "L"), optional=True, doc="True = real token; default all True"),
    "t": Field("long", ("B",), optional=True, doc="diffusion timesteps in [0, T)"),
    "noise": Field("float", ("B", "C", "H", "W"), optional=True, doc="Gaussian noise of q(x_t | x0)"),
    "drop_image": Field("bool", ("B",), optional=True, doc="rows trained with the null image embedding"),
    "drop_text": Field("bool", ("B",), optional=True, doc="rows trained with the null caption"),
}


def training_loss(network: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None):
    """Mean loss on a batch of images: t, noise and the CFG dropout masks (image_drop_prob,
    text_drop_prob, independent) are drawn unless the batch has them.

    Simple MSE on the configured target; with learned variance plus Improved DDPM's
    vlb_weight * L_vlb (`Decoder._vlb`), which trains the variance head with a stopped mean.
    Autocast-friendly: the loss is computed in float32. Metrics: loss, mse (+ vlb)."""
    check_batch(BATCH, batch, "decoder")
    model = unwrap(network)
    cfg = model.config
    x0 = batch["image"]
    B, dev = x0.shape[0], x0.device
    sched = model.training_scheduler
    t = batch["t"] if "t" in batch else diffusion.sample_timesteps(B, sched, generator, device=dev,
                                                                   logit_mean=cfg.timestep_logit_mean,
                                                                   logit_std=cfg.timestep_logit_std)
    noise = batch["noise"] if "noise" in batch else diffusion.randn(x0.shape, generator, device=dev, dtype=x0.dtype)
    drop_image = batch["drop_image"] if "drop_image" in batch else bernoulli(cfg.image_drop_prob, B, generator, dev)
    drop_text = batch["drop_text"] if "drop_text" in batch else bernoulli(cfg.text_drop_prob, B, generator, dev)
    x_t = diffusion.add_noise(sched, x0, noise, t)
    out = network(x_t, t, batch["image_emb"], batch.get("text_emb"), batch.get("text_states"), batch.get("text_mask"),
                  drop_image, drop_text).float()
    C = x0.shape[1]
    target = diffusion.training_target(sched, x0, noise, t).float()
    if cfg.min_snr_gamma is None:
        mse = F.mse_loss(out[:, :C], target)
    else:
        per_sample = (out[:, :C] - target).pow(2).mean(dim=(1, 2, 3))
        mse = (diffusion.min_snr_weight(sched, t, cfg.min_snr_gamma) * per_sample).mean()
    if not cfg.learned_variance:
        return mse, detached(loss=mse, mse=mse)
    vlb = model._vlb(sched, out, x0.float(), x_t.float(), t)
    loss = mse + cfg.vlb_weight * vlb
    return loss, detached(loss=loss, mse=mse, vlb=vlb)


@migration("decoder.Decoder", from_version=1)
def _decoder_v1_to_v2(config: dict) -> dict:
    """Format 1 named the CLIP width `clip_dim` and the dropout rates `image_emb_dropout` and
    `text_dropout`; format 2 uses the names every model uses (embed_dim, *_drop_prob)."""
    config = dict(config)
    for old, new in (("clip_dim", "embed_dim"), ("image_emb_dropout", "image_drop_prob"), ("text_dropout", "text_drop_prob")):
        if old in config:
            config[new] = config.pop(old)
    return config
