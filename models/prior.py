"""Diffusion prior P(z_i | y) (paper section 2.2), built on diffusers' `PriorTransformer`.

The network is diffusers' `PriorTransformer` (the one Karlo and Kandinsky ship), held as the
submodule `self.transformer`, so a directory written by `PriorTransformer.save_pretrained`
(e.g. Karlo's `prior/`) can be the starting point: `DiffusionPrior.from_diffusers(path)`.
What diffusers does not have is here: the training objective with text dropout and learned null
states, classifier-free guidance, and best-of-`candidates` sampling.

Sequence (diffusers' order, the paper's order):
    [text token states (text_len), z_t, timestep embedding, noised z_i, final query] -> clean z_i

Embedding scaling lives in one place, `to_latent` / `from_latent`: the diffusion runs on
x = (z_i - clip_mean) / clip_std with `clip_mean`, `clip_std` the PriorTransformer's own
(frozen) parameters. For our models they start as mean 0, std 1/sqrt(embed_dim), i.e.
x = z_i * sqrt(embed_dim) (what DALLE2-pytorch does: a unit-norm z_i gets unit variance per
component, the scale the noise schedule assumes). For Karlo weights they are Karlo's per-dimension
statistics, loaded with the checkpoint (that is what diffusers' `post_process_latents` applies).
z_t and the text token states are fed as given (L2-normalised z_t in our data contract).

`forward` runs the PriorTransformer's own submodules in diffusers' order (tested equal to
`PriorTransformer.forward`, outputs and gradients), with one difference: the causal mask is always
applied (diffusers applies it only when `attention_mask` is passed: a pitfall). It skips work that
cannot change the result:
- caption padding is cut off: masked tokens change nothing in diffusers' computation (their keys
  get -10000, i.e. weight 0), so a batch of short captions costs ~20 instead of 81 positions;
- rows are independent, so rows with much shorter captions (e.g. the one-token null caption of
  dropped rows) run as a second, shorter batch (`row_groups`);
  (these two read the mask's values to choose shapes, so they run on the CPU only: on an
  accelerator or under torch.compile that read would stall the device, and a full-length masked
  batch is cheap there)
- only the final query's output is used and attention is causal, so the last block computes that
  position only, with its keys and values reassociated per head (`_last_block`);
- blocks are called through their submodules (attention processors set on the transformer are
  not used; no generic per-call checks; causal-only attention for batches without padding, the
  faster kernel path; residual adds in place). `check_transformer` refuses, naming the diffusers
  version, a PriorTransformer whose blocks are not the ones this was written for.
The null caption is, like Karlo's empty-caption unconditional, short: learned token states of which
only the first `null_text_mask` positions are visible (one by default).

Guidance convention (diffusers', Karlo's): x0 = uncond + s * (cond - uncond)
                                               = cond + (s - 1) * (cond - uncond); s = 1 is cond.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import PriorTransformer, SchedulerMixin
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn
from torch.nn import functional as F

from models import diffusion
from models.checkpoint import migration, register
from models.diffusers_blocks import WRITTEN_FOR, UnexpectedDiffusersBlock, equals, expect_block, is_none_or, is_type
from models.objective import Field, bernoulli, check_batch, detached, unwrap

SAMPLERS = ("ddpm", "ddim")


@dataclass
class PriorConfig:
    embed_dim: int = 768  # CLIP embedding width (z_i and z_t)
    text_dim: int = 768  # width of the caption token states; projected to embed_dim if different
    text_len: int = 77  # caption tokens (shorter inputs are padded and masked)
    num_heads: int = 12
    head_dim: int = 64  # model width = num_heads * head_dim
    num_layers: int = 12
    dropout: float = 0.0
    norm_in: bool = False  # LayerNorm before the blocks (diffusers `norm_in_type="layer"`)
    text_drop_prob: float = 0.1  # paper: text conditioning dropped 10% of the time
    num_train_timesteps: int = 1000
    schedule: str = "cosine"  # noise schedule (models.diffusion.SCHEDULES); cosine as paper, Karlo
    clip_sample: float | None = None  # clamp predicted latents to [-c, c] when sampling; None: off (Karlo: 5)
    normalize: bool = True  # L2-normalise sampled z_i: our embeddings are unit vectors; Karlo's are not

    def __post_init__(self):
        for name in ("embed_dim", "text_dim", "text_len", "num_heads", "head_dim", "num_layers", "num_train_timesteps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PriorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.text_drop_prob < 1.0:
            raise ValueError(f"PriorConfig.text_drop_prob must be in [0, 1), got {self.text_drop_prob}")
        if self.schedule not in diffusion.SCHEDULES:
            raise ValueError(f"PriorConfig.schedule must be one of {tuple(diffusion.SCHEDULES)}, got {self.schedule!r}")

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim


# Named sizes. tiny: tests and demo (0.12M, CPU, seconds). small: a CPU-trainable prior (21M).
# base: Karlo's prior (diffusers config of kakaobrain/karlo-v1-alpha, ~1B with ViT-L/14 CLIP).
# paper: appendix C says 1B parameters for ViT-H/16 CLIP (1024-d); layout assumed Karlo-like.
SIZES: dict[str, PriorConfig] = {
    "tiny": PriorConfig(embed_dim=32, text_dim=32, text_len=8, num_heads=2, head_dim=32, num_layers=2),
    "small": PriorConfig(embed_dim=512, text_dim=512, text_len=77, num_heads=8, head_dim=64, num_layers=6),
    "base": PriorConfig(embed_dim=768, text_dim=768, text_len=77, num_heads=32, head_dim=64, num_layers=20),
    "paper": PriorConfig(embed_dim=1024, text_dim=1024, text_len=77, num_heads=32, head_dim=64, num_layers=20),
}


def make_scheduler(config: PriorConfig, sampler: str = "ddim"):
    """The diffusers scheduler the prior samples with: x0 ("sample") prediction, the project's
    pinned configuration (models.diffusion: trailing timesteps, so the first step is t = T-1)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return diffusion.make_scheduler(
        sampler,
        schedule=config.schedule,
        prediction_type="sample",
        num_train_timesteps=config.num_train_timesteps,
        clip_sample=config.clip_sample,
    )


def pad_caption(text_states: torch.Tensor, text_mask: torch.Tensor | None, text_dim: int, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad caption token states to text_len; return (states [B, L, text_dim], bool mask [B, L]).
    Shared by both priors."""
    if text_states.ndim != 3 or text_states.shape[-1] != text_dim:
        raise ValueError(f"text_states must be [batch, tokens, {text_dim}], got {tuple(text_states.shape)}")
    b, n, _ = text_states.shape
    if n > text_len:
        raise ValueError(f"text_states has {n} tokens, more than this prior's text_len={text_len}")
    if text_mask is None:
        text_mask = torch.ones(b, n, dtype=torch.bool, device=text_states.device)
    if text_mask.shape != (b, n):
        raise ValueError(f"text_mask must be [{b}, {n}] like text_states, got {tuple(text_mask.shape)}")
    text_mask = text_mask.bool()
    if n < text_len:
        text_states = F.pad(text_states, (0, 0, 0, text_len - n))
        text_mask = F.pad(text_mask, (0, text_len - n), value=False)
    return text_states, text_mask


@register("prior.DiffusionPrior", format_version=1)
class DiffusionPrior(nn.Module):
    config_class = PriorConfig

    def __init__(self, config: PriorConfig, transformer: PriorTransformer | None = None):
        super().__init__()
        self.config = config
        c = config
        if transformer is None:
            transformer = PriorTransformer(
                num_attention_heads=c.num_heads,
                attention_head_dim=c.head_dim,
                num_layers=c.num_layers,
                embedding_dim=c.embed_dim,
                num_embeddings=c.text_len,
                additional_embeddings=4,  # z_t, timestep, noised z_i, final query
                dropout=c.dropout,
                norm_in_type="layer" if c.norm_in else None,
            )
            # diffusers initialises clip_std to zeros ("unset"); ours: x = z * sqrt(dim).
            with torch.no_grad():
                transformer.clip_mean.zero_()
                transformer.clip_std.fill_(1.0 / math.sqrt(c.embed_dim))
        check_transformer(transformer)
        self.transformer = transformer
        # Normalisation statistics are data statistics, not trained weights.
        transformer.clip_mean.requires_grad_(False)
        transformer.clip_std.requires_grad_(False)
        # PriorTransformer projects token states of width embedding_dim; adapt other text widths.
        self.text_in = nn.Linear(c.text_dim, c.embed_dim) if c.text_dim != c.embed_dim else None
        # Learned null conditioning for classifier-free guidance (set_null_condition can fill it
        # with an encoded empty caption, which is what Karlo's pipeline uses as "unconditional").
        self.null_text_states = nn.Parameter(torch.zeros(c.text_len, c.text_dim))
        self.null_text_emb = nn.Parameter(torch.zeros(c.embed_dim))
        self.register_buffer("null_text_mask", torch.arange(c.text_len) < 1)
        self.training_scheduler = make_scheduler(config, "ddpm")  # q(x_t | x0) for the objective

    def scheduler(self, sampler: str):
        """A fresh scheduler to sample with ("ddpm" or "ddim"; diffusers' are stateful)."""
        return make_scheduler(self.config, sampler)

    # ----- the one place where embeddings are scaled -----
    def to_latent(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.transformer.clip_mean) / self.transformer.clip_std

    def from_latent(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.transformer.clip_std + self.transformer.clip_mean

    # ----- conditioning -----
    def prepare_text(self, text_states: torch.Tensor, text_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_caption(text_states, text_mask, self.config.text_dim, self.config.text_len)

    def drop_condition(self, text_emb, text_states, text_mask, drop: torch.Tensor):
        """Replace the text condition of rows where `drop` is True with the learned null states."""
        d = drop.view(-1, 1)
        text_emb = torch.where(d, self.null_text_emb.to(text_emb.dtype), text_emb)
        text_states = torch.where(d[..., None], self.null_text_states.to(text_states.dtype), text_states)
        text_mask = torch.where(d, self.null_text_mask, text_mask)
        return text_emb, text_states, text_mask

    @torch.no_grad()
    def set_null_condition(self, text_emb: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor | None = None):
        """Use an encoded empty caption as the null condition (e.g. before fine-tuning Karlo)."""
        states, mask = self.prepare_text(text_states.reshape(1, -1, self.config.text_dim), None if text_mask is None else text_mask.reshape(1, -1))
        self.null_text_states.copy_(states[0] * mask[0, :, None])
        self.null_text_mask.copy_(mask[0])
        self.null_text_emb.copy_(text_emb.reshape(-1))

    # ----- network -----
    def forward(self, x_t, t, text_emb, text_states, text_mask=None, drop_text=None) -> torch.Tensor:
        """Predict the clean latent x0 from the noised latent x_t [B, D] at integer steps t [B].
        drop_text: bool [B], rows whose text condition is replaced by the learned null one."""
        c = self.config
        if x_t.ndim != 2 or x_t.shape[-1] != c.embed_dim:
            raise ValueError(f"x_t must be [batch, {c.embed_dim}], got {tuple(x_t.shape)}")
        if text_emb.shape != x_t.shape:
            raise ValueError(f"text_emb must be {tuple(x_t.shape)} like x_t, got {tuple(text_emb.shape)}")
        text_states, text_mask = self.prepare_text(text_states, text_mask)
        if drop_text is not None:
            text_emb, text_states, text_mask = self.drop_condition(text_emb, text_states, text_mask, drop_text)
        b = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(b)
        if not _reads_values_freely(text_mask):
            # on an accelerator (or under torch.compile), choosing the shapes below from the mask's
            # values would wait for the device: run every row at full length with the mask instead
            return self._predict(x_t, t, text_emb, text_states, text_mask, padded=True)
        # Rows are independent, so rows with short captions (e.g. the one-token null caption of
        # dropped rows) can run as their own, shorter batch: exact, masked keys have weight 0.
        lengths = (text_mask * torch.arange(1, c.text_len + 1, device=text_mask.device)).amax(1).clamp(min=1)
        groups = row_groups(lengths.tolist())
        if len(groups) == 1:
            n = groups[0][1]
            return self._predict(x_t, t, text_emb, text_states[:, :n], text_mask[:, :n])
        outs = []
        for rows, n in groups:
            r = torch.tensor(rows, device=x_t.device)
            outs.append(self._predict(x_t[r], t[r], text_emb[r], text_states[r, :n], text_mask[r, :n]))
        order = torch.tensor([i for rows, _ in groups for i in rows], device=x_t.device)
        return torch.cat(outs)[order.argsort()]

    def _predict(self, x_t, t, text_emb, text_states, text_mask, padded: bool | None = None) -> torch.Tensor:
        """diffusers' PriorTransformer.forward, step by step, on captions cut to n tokens.
        padded: whether text_mask has False entries; None reads it from the mask (a host read)."""
        n = text_states.shape[1]
        if self.text_in is not None:
            text_states = self.text_in(text_states)
        b = x_t.shape[0]
        tr = self.transformer
        time_emb = tr.time_embedding(tr.time_proj(t).to(x_t.dtype))
        pos = tr.positional_embedding.to(x_t.dtype)
        L = self.config.text_len
        h = torch.cat(
            [
                tr.encoder_hidden_states_proj(text_states) + pos[:, :n],
                torch.stack([tr.embedding_proj(text_emb), time_emb, tr.proj_in(x_t), tr.prd_embedding[:, 0].to(x_t.dtype).expand(b, -1)], 1)
                + pos[:, L : L + 4],
            ],
            dim=1,
        )
        if padded is None:
            padded = not bool(text_mask.all())
        if not padded:
            mask = None  # causal only: is_causal=True, the faster flash kernel path
        else:  # diffusers' mask: -10000 on padded keys and above the diagonal
            keys = F.pad(text_mask, (0, 4), value=True)
            causal = tr.causal_attention_mask[0, : n + 4, : n + 4]
            mask = (((~keys).to(h.dtype) * -10000.0)[:, None, :] + causal.to(h.dtype))[:, None]  # [B, 1, S, S]
        if tr.norm_in is not None:
            h = tr.norm_in(h)
        blocks = tr.transformer_blocks
        for block in blocks[:-1]:
            h = _block(block, h, mask)
        # Only the final query's output is used and attention is causal: the last block needs
        # that row only (keys/values see all rows; reassociated in _last_block).
        return tr.proj_to_clip_embeddings(tr.norm_out(_last_block(blocks[-1], h, mask)))

    # ----- sampling -----
    def model_fn(self, text_emb, text_states, text_mask):
        """The denoiser models.diffusion samples with: f(x, t, conditional) -> predicted x0."""
        text_states, text_mask = self.prepare_text(text_states, text_mask)
        b = text_emb.shape[0]
        null = self.drop_condition(text_emb, text_states, text_mask, torch.ones(b, dtype=torch.bool, device=text_emb.device))

        stacked: dict[int, tuple] = {}  # the condition repeated k times, made once per sampling chain

        def fn(x, t, conditional: bool | torch.Tensor = True):
            if isinstance(conditional, torch.Tensor):  # x stacks copies of the b conditions' rows
                k = x.shape[0] // b
                if k not in stacked:
                    stacked[k] = (text_emb.repeat(k, 1), text_states.repeat(k, 1, 1), text_mask.repeat(k, 1))
                return self(x, t, *stacked[k], drop_text=~conditional)
            return self(x, t, text_emb, text_states, text_mask) if conditional else self(x, t, *null)

        fn.takes_row_mask = True
        return fn

    def guided_x0(self, x_t, t, text_emb, text_states, text_mask, guidance_scale: float) -> torch.Tensor:
        """x0 prediction with classifier-free guidance at `guidance_scale`."""
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        return diffusion.guided(self.model_fn(text_emb, text_states, text_mask), guidance_scale)(x_t, t)

    @torch.no_grad()
    def sample(
        self,
        text_emb: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        steps: int = 64,
        sampler: str = "ddim",
        guidance_scale: float = 1.0,
        candidates: int = 2,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        normalize: bool | None = None,
    ) -> torch.Tensor:
        """Draw z_i [B, D] for each caption; of `candidates` draws keep the one with the highest
        dot product with z_t (paper section 2.2). normalize: L2-normalise the result; default the
        config's (on for our unit-norm data contract; off for Karlo weights, whose decoder takes
        unnormalised embeddings)."""
        normalize = self.config.normalize if normalize is None else normalize
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        b = text_emb.shape[0]
        text_states, text_mask = self.prepare_text(text_states, text_mask)
        emb = text_emb.repeat_interleave(candidates, 0)
        states = text_states.repeat_interleave(candidates, 0)
        mask = text_mask.repeat_interleave(candidates, 0)
        x_T = diffusion.randn(emb.shape, generator, emb.device, emb.dtype)
        x = diffusion.sample(
            self.model_fn(emb, states, mask), self.scheduler(sampler), x_T, steps,
            eta=eta, generator=generator, guidance_scale=guidance_scale,
        )
        z = self.from_latent(x)
        if normalize:
            z = F.normalize(z, dim=-1)
        return best_of(z.view(b, candidates, -1), text_emb)

    # ----- diffusers interop -----
    @classmethod
    def from_diffusers(cls, source: str | Path | PriorTransformer, text_dim: int | None = None,
                       scheduler: str | Path | SchedulerMixin | None = None, **overrides) -> "DiffusionPrior":
        """Wrap a diffusers PriorTransformer (a module or a `save_pretrained` directory).

        Only the layout diffusers uses for unCLIP is accepted: 4 additional embeddings with the
        final "prd" query token. A PriorTransformer whose clip_std was never set (all zeros, the
        diffusers init) gets our default scaling 1/sqrt(embed_dim).

        scheduler: the scheduler it was trained with (a scheduler or its `save_pretrained`
        directory, e.g. Karlo's `prior_scheduler/`): sets the schedule and the x0 clamp (Karlo's
        UnCLIPScheduler clamps predicted latents to +-5). Sampled z_i are not L2-normalised
        (`normalize=False`): diffusers' unCLIP embeddings are the unnormalised CLIP projections,
        and so must the text embeddings given to it be, with its null condition set from an
        encoded empty caption (`set_null_condition`), as diffusers' UnCLIPPipeline does.
        `overrides` set any PriorConfig field (e.g. normalize=True to fine-tune on our data)."""
        overrides = {"normalize": False, **_scheduler_fields(scheduler), **overrides}
        transformer = source if isinstance(source, PriorTransformer) else PriorTransformer.from_pretrained(str(source))
        d = transformer.config
        if d.additional_embeddings != 4 or d.added_emb_type != "prd" or d.encoder_hid_proj_type != "linear":
            raise ValueError(
                "only unCLIP-layout PriorTransformers load (additional_embeddings=4, added_emb_type='prd', "
                f"encoder_hid_proj_type='linear'); got {d.additional_embeddings}, {d.added_emb_type!r}, {d.encoder_hid_proj_type!r}"
            )
        if (d.embedding_proj_dim or d.embedding_dim) != d.embedding_dim or (d.clip_embed_dim or d.embedding_dim) != d.embedding_dim:
            raise ValueError("PriorTransformer with embedding_proj_dim/clip_embed_dim != embedding_dim is not supported")
        if d.norm_in_type not in (None, "layer") or d.embedding_proj_norm_type is not None:
            raise ValueError(f"unsupported PriorTransformer norms: norm_in_type={d.norm_in_type!r}, embedding_proj_norm_type={d.embedding_proj_norm_type!r}")
        config = PriorConfig(
            embed_dim=d.embedding_dim,
            text_dim=text_dim or d.embedding_dim,
            text_len=d.num_embeddings,
            num_heads=d.num_attention_heads,
            head_dim=d.attention_head_dim,
            num_layers=d.num_layers,
            dropout=d.dropout,
            norm_in=d.norm_in_type == "layer",
            **overrides,
        )
        # diffusers' loader can leave parameters at unaligned offsets of the safetensors file; MKL's
        # one-row matmuls (the last block's final query at batch 1) round differently there, so
        # give them fresh memory: a loaded model then computes bit-identically to a saved copy.
        with torch.no_grad():
            for param in transformer.parameters():
                param.data = param.data.clone()
        if not torch.any(transformer.clip_std != 0):
            with torch.no_grad():
                transformer.clip_std.fill_(1.0 / math.sqrt(d.embedding_dim))
        return cls(config, transformer=transformer)



def _scheduler_fields(scheduler) -> dict:
    """PriorConfig fields from a diffusers scheduler (or its save_pretrained directory)."""
    if scheduler is None:
        return {}
    if isinstance(scheduler, (str, Path)):
        path = Path(scheduler) / "scheduler_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: pass the scheduler's save_pretrained directory (e.g. Karlo's prior_scheduler/)")
        cfg = json.loads(path.read_text())
    else:
        cfg = dict(scheduler.config)
    schedules = {v: k for k, v in diffusion.SCHEDULES.items()}
    if cfg.get("prediction_type", "epsilon") != "sample":
        raise ValueError(f"scheduler prediction_type={cfg.get('prediction_type')!r}; the diffusion prior predicts x0 ('sample')")
    if cfg.get("beta_schedule") not in schedules:
        raise ValueError(f"scheduler beta_schedule={cfg.get('beta_schedule')!r}; supported: {sorted(schedules)}")
    clip = cfg.get("clip_sample", True)  # UnCLIPScheduler's and DDPMScheduler's default
    return dict(schedule=schedules[cfg["beta_schedule"]],
                num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
                clip_sample=float(cfg.get("clip_sample_range", 1.0)) if clip else None)


# What _predict, _block and _last_block rely on (diffusers_blocks.expect_block refuses anything else)
_TRANSFORMER_CHECKS = {
    "time_proj": is_type(Timesteps),
    "time_embedding": is_type(TimestepEmbedding),
    "proj_in": is_type(nn.Linear),
    "embedding_proj": is_type(nn.Linear),
    "encoder_hidden_states_proj": is_type(nn.Linear),
    "embedding_proj_norm": equals(None),
    "norm_in": is_none_or(is_type(nn.LayerNorm)),
    "norm_out": is_type(nn.LayerNorm),
    "proj_to_clip_embeddings": is_type(nn.Linear),
    "positional_embedding": lambda p: p.ndim == 3,
    "prd_embedding": lambda p: p.ndim == 3 and p.shape[1] == 1,
    "causal_attention_mask": lambda m: m.ndim == 3,
    "transformer_blocks": is_type(nn.ModuleList),
}
_TRANSFORMER_CHILDREN = {"time_proj", "time_embedding", "proj_in", "embedding_proj", "encoder_hidden_states_proj",
                         "norm_in", "transformer_blocks", "norm_out", "proj_to_clip_embeddings"}
_BLOCK_CHECKS = {
    "norm_type": equals("layer_norm"),
    "only_cross_attention": equals(False),
    "pos_embed": equals(None),
    "attn2": equals(None),
    "_chunk_size": equals(None),
    "norm1": is_type(nn.LayerNorm),
    "norm3": is_type(nn.LayerNorm),
    "ff": is_type(FeedForward),
    # an Attention whose scale is scaled_dot_product_attention's default, 1/sqrt(head width)
    "attn1": lambda a: type(a) is Attention and abs(a.scale - (a.to_q.out_features // a.heads) ** -0.5) < 1e-12,
    "attn1.is_cross_attention": equals(False),
    "attn1.residual_connection": equals(False),
    "attn1.rescale_output_factor": equals(1.0),
    "attn1.norm_q": equals(None),
    "attn1.norm_k": equals(None),
    "attn1.group_norm": equals(None),
    "attn1.spatial_norm": equals(None),
    "attn1.norm_cross": equals(None),
    "attn1.to_q": is_type(nn.Linear),
    "attn1.to_k": is_type(nn.Linear),
    "attn1.to_v": is_type(nn.Linear),
    "attn1.to_out": lambda m: len(m) == 2 and type(m[0]) is nn.Linear and type(m[1]) is nn.Dropout,
}
_BLOCK_CHILDREN = {"norm1", "attn1", "norm3", "ff"}
_ATTENTION_CHILDREN = {"to_q", "to_k", "to_v", "to_out"}


def check_transformer(transformer: PriorTransformer) -> None:
    """Raise UnexpectedDiffusersBlock (with the diffusers version) unless `transformer` and its
    blocks are what DiffusionPrior's forward, which runs their submodules directly, was written for."""
    where = "models.prior.DiffusionPrior.forward"
    expect_block(transformer, "transformer", where, _TRANSFORMER_CHECKS, _TRANSFORMER_CHILDREN)
    for i, block in enumerate(transformer.transformer_blocks):
        if type(block) is not BasicTransformerBlock:
            raise UnexpectedDiffusersBlock(f"transformer.transformer_blocks.{i} is a {type(block).__name__}; {where} "
                                           f"was written for diffusers {WRITTEN_FOR}'s BasicTransformerBlock")
        expect_block(block, f"transformer.transformer_blocks.{i}", where, _BLOCK_CHECKS, _BLOCK_CHILDREN)
        expect_block(block.attn1, f"transformer.transformer_blocks.{i}.attn1", where, {}, _ATTENTION_CHILDREN)


def _reads_values_freely(t: torch.Tensor) -> bool:
    """Whether reading t's values on the host costs no device synchronisation and no graph break:
    a CPU tensor outside torch.compile. Shape decisions from data are made only then."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def row_groups(lengths: list[int], min_saving: float = 0.05) -> list[tuple[list[int], int]]:
    """Split batch rows with caption lengths `lengths` into at most two groups (rows, max length)
    such that the positions computed, sum of rows * (length + 4), are fewest; one group unless
    that saves at least `min_saving` (each group costs a few more kernel launches)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    s = [lengths[i] for i in order]
    b, longest = len(s), s[-1]
    full = b * (longest + 4)
    cost, k = min((k * (s[k - 1] + 4) + (b - k) * (longest + 4), k) for k in range(1, b + 1))
    if k == b or cost > (1 - min_saving) * full:
        return [(list(range(b)), longest)]
    return [(order[:k], s[k - 1]), (order[k:], longest)]


def _block(block, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """diffusers' BasicTransformerBlock (layer norms, self-attention, GELU feed-forward, as
    PriorTransformer builds it) on its own submodules, without its generic per-call checks.
    mask: float [B, 1, S, S], or None for causal only."""
    attn = block.attn1
    b, s, _ = h.shape
    x = block.norm1(h)
    q, k, v = (proj(x).view(b, s, attn.heads, -1).transpose(1, 2) for proj in (attn.to_q, attn.to_k, attn.to_v))
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    # residual adds in place into the fresh projection outputs (autograd keeps neither): on CPU,
    # every fresh activation-sized tensor costs page faults, about as much as the add itself
    h = attn.to_out[1](attn.to_out[0](a.transpose(1, 2).reshape(b, s, -1))).add_(h)
    return block.ff(block.norm3(h)).add_(h)


def _last_block(block, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`_block`'s output at the final position only [B, W]: the only one the prediction uses.
    That query sees every key, so only the padding part of the mask applies. Its keys and values
    are linear in the normed states x, so they are not computed per position (W x W each) but
    reassociated per head h (W each): q_h . (Wk_h x_j + bk_h) = (q_h Wk_h) . x_j + q_h . bk_h and
    sum_j p_j (Wv_h x_j + bv_h) = Wv_h (sum_j p_j x_j) + bv_h (the weights p_j sum to 1). The
    q_h . bk_h term does not change the softmax but is kept so that bk gets diffusers' gradient."""
    attn = block.attn1
    b, s, width = h.shape
    heads = attn.heads
    x = block.norm1(h)
    q = attn.to_q(x[:, -1]).view(b, heads, -1)  # [B, H, D]
    wk = attn.to_k.weight.view(heads, -1, width)  # [H, D, W]
    wv = attn.to_v.weight.view(heads, -1, width)
    scores = torch.einsum("bhd,hdw->bhw", q, wk) @ x.transpose(1, 2)  # [B, H, S]
    if attn.to_k.bias is not None:
        scores = scores + (q * attn.to_k.bias.view(heads, -1)).sum(-1, keepdim=True)
    scores = scores * q.shape[-1] ** -0.5  # scaled_dot_product_attention's default scale
    if mask is not None:
        scores = scores + mask[:, :, -1]
    a = torch.einsum("bhw,hdw->bhd", scores.softmax(-1) @ x, wv)  # [B, H, D]
    if attn.to_v.bias is not None:
        a = a + attn.to_v.bias.view(heads, -1)
    h = h[:, -1] + attn.to_out[1](attn.to_out[0](a.reshape(b, width)))
    return h + block.ff(block.norm3(h))


def best_of(candidates: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """candidates [B, C, D] -> [B, D]: the candidate with the highest dot product with z_t."""
    score = torch.einsum("bcd,bd->bc", candidates, text_emb.to(candidates.dtype))
    index = score.argmax(dim=1)
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), index]


# ----- training objective (models.objective) -----

BATCH: dict[str, Field] = {
    "image_emb": Field("float", ("B", "embed_dim"), doc="CLIP image embedding z_i, the target"),
    "text_emb": Field("float", ("B", "embed_dim"), doc="CLIP text embedding z_t"),
    "text_states": Field("float", ("B", "L", "text_dim"), doc="caption token states; L <= text_len"),
    "text_mask": Field("bool", ("B", "L"), optional=True, doc="True = real token; default all True"),
    "t": Field("long", ("B",), optional=True, doc="diffusion timesteps in [0, T)"),
    "noise": Field("float", ("B", "embed_dim"), optional=True, doc="Gaussian noise of q(x_t | x0), latent units"),
    "drop_text": Field("bool", ("B",), optional=True, doc="rows trained with the null text condition"),
}


def training_loss(network: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None):
    """MSE between predicted and true clean latent (paper: L = E||f(z_i^(t), t, y) - z_i||^2), with
    t ~ U{0..T-1}, Gaussian noise and text dropout (text_drop_prob) drawn unless the batch has them."""
    check_batch(BATCH, batch, "prior")
    model = unwrap(network)
    image_emb = batch["image_emb"]
    b, device = image_emb.shape[0], image_emb.device
    sched = model.training_scheduler
    x0 = model.to_latent(image_emb)
    t = batch["t"] if "t" in batch else diffusion.sample_timesteps(b, sched, generator, device)
    noise = batch["noise"] if "noise" in batch else diffusion.randn(x0.shape, generator, device, x0.dtype)
    drop = batch["drop_text"] if "drop_text" in batch else bernoulli(model.config.text_drop_prob, b, generator, device)
    x_t = diffusion.add_noise(sched, x0, noise, t)
    pred = network(x_t, t, batch["text_emb"], batch["text_states"], batch.get("text_mask"), drop)
    mse = F.mse_loss(pred.float(), diffusion.training_target(sched, x0, noise, t).float())
    return mse, detached(loss=mse, mse=mse)


@migration("prior.DiffusionPrior", from_version=0)
def _prior_v0_to_v1(config: dict) -> dict:
    """Format 0 (the first draft of this class) named the CLIP width `clip_dim` and had no
    `text_drop_prob` (it always dropped 10%). Kept as the worked example of a migration."""
    config = dict(config)
    if "clip_dim" in config:
        config["embed_dim"] = config.pop("clip_dim")
    config.setdefault("text_drop_prob", 0.1)
    return config
