"""The composed unCLIP sampler and the paper's section-3/4 manipulations.

    captions -> (z_t, token states) -> prior -> z_i -> decoder -> upsampler(s) -> image

Every stage has its own steps, sampler (DDPM/DDIM), eta and guidance (`Stage`). The CLIP text
encoder and the prior are passed in as objects meeting small Protocols, so this module depends
only on what it calls: `text_encoder(captions) -> TextCondition` and
`prior.sample(text_emb, text_states, text_mask, *, generator, **prior_kwargs) -> z_i`.

Manipulations (section 3): an image is the bipartite latent (z_i, x_T), x_T from DDIM inversion
with the decoder conditioned on z_i. Variations decode (z_i, x_T) with eta > 0; interpolations
slerp z_i (and the x_T's, or keep one x_T); text diffs slerp z_i towards norm(z_t - z_t0). PCA
probe (section 4): rebuild z_i from its first k principal components, decode with a fixed seed.
Only the decoder stage sees these latents; upsamplers run after it as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from . import diffusion
from .decoder import Decoder
from .pca import PcaBasis
from .upsampler import Upsampler, downsample_to


@dataclass
class TextCondition:
    emb: torch.Tensor  # z_t (B, embed_dim)
    states: torch.Tensor  # caption token states (B, L, text_dim)
    mask: torch.Tensor | None = None  # (B, L) bool, True = real token

    def __len__(self) -> int:
        return self.emb.shape[0]

    def repeat(self, n: int) -> "TextCondition":
        rep = lambda x: None if x is None else x.repeat_interleave(n, 0)
        return TextCondition(rep(self.emb), rep(self.states), rep(self.mask))


class TextEncoder(Protocol):
    def __call__(self, captions: Sequence[str]) -> TextCondition: ...


class Prior(Protocol):
    def sample(self, text_emb: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor | None = None, *,
               generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor: ...


def clip_text_encoder(clip, normalize: bool = True) -> TextEncoder:
    """Adapter for models.clip.ClipEncoder-like objects (tokenize + encode_text_with_hidden);
    padding is token id 0 (open_clip). normalize: unit-norm z_t (our data contract); False for
    Karlo / diffusers unCLIP weights, which take the unnormalised CLIP text projection."""

    def encode(captions: Sequence[str]) -> TextCondition:
        tokens = clip.tokenize(list(captions))
        emb, states = clip.encode_text_with_hidden(tokens, normalize=normalize)
        return TextCondition(emb, states, (tokens != 0).to(states.device))

    return encode


@dataclass
class Stage:
    """Sampling settings of one diffusion stage."""
    steps: int = 50
    sampler: str = "ddim"
    eta: float = 0.0
    guidance_scale: float = 1.0
    clip_sample: float | None = 1.0  # decoder only; None to decode an inverted x_T exactly


# Karlo's published settings (prior 25 steps, guidance 4; decoder 50 steps, guidance 8; SR 7).
# The prior's keyword arguments default to the prior's own (the AR prior has no `steps`).
KARLO_DIFFUSION_PRIOR = dict(steps=25, guidance_scale=4.0)
DEFAULT_DECODER = Stage(steps=50, guidance_scale=8.0)
DEFAULT_UPSAMPLER = Stage(steps=7)


# ---------------------------------------------------------------------------------------------
# Latent arithmetic


def slerp(a: torch.Tensor, b: torch.Tensor, theta: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation along the last dim (rows of a batch independently).

    The direction moves at constant angular speed from a (theta=0) to b (theta=1); the norm is
    interpolated linearly, so unit vectors stay unit and Gaussian x_T's keep their scale.
    """
    theta = torch.as_tensor(theta, dtype=a.dtype, device=a.device)
    if theta.dim() == 1:
        theta = theta.unsqueeze(-1)
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na, b / nb
    omega = torch.acos((ua * ub).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    direction = (torch.sin((1 - theta) * omega) * ua + torch.sin(theta * omega) * ub) / so
    return direction * ((1 - theta) * na + theta * nb)


def slerp_images(a: torch.Tensor, b: torch.Tensor, theta: float | torch.Tensor) -> torch.Tensor:
    """slerp of whole tensors per batch row (x_T's), flattened to vectors."""
    return slerp(a.flatten(1), b.flatten(1), theta).view_as(a)


def text_diff(image_emb: torch.Tensor, text_emb: torch.Tensor, base_text_emb: torch.Tensor,
              theta: float | torch.Tensor) -> torch.Tensor:
    """Section 3.3: z_d = norm(z_t - z_t0); slerp(z_i, z_d, theta)."""
    z_d = F.normalize(text_emb - base_text_emb, dim=-1)
    return slerp(image_emb, z_d, theta)


def pca_reconstruct(image_emb: torch.Tensor, basis: PcaBasis, k: int, normalize: bool = True) -> torch.Tensor:
    """z_i rebuilt from its first k PCA coordinates of `basis` (e.g. the pca stage's, loaded with
    tasks.schema.load_pca). normalize: back to the unit sphere the decoder was trained on."""
    if not 0 <= k <= basis.components.shape[0]:
        raise ValueError(f"k={k} must be in [0, {basis.components.shape[0]}] (number of PCA components)")
    return basis.reconstruct(basis.project(image_emb, k), normalize=normalize).to(image_emb)


# ---------------------------------------------------------------------------------------------
# The composed model


class UnCLIP:
    """Holds the stages; every method is a sampler. Not an nn.Module: each stage is checkpointed
    on its own (models.checkpoint) and the text encoder/prior may be any objects."""

    def __init__(self, decoder: Decoder, prior: Prior | None = None, upsamplers: Sequence[Upsampler] = (),
                 text_encoder: TextEncoder | Callable[[Sequence[str]], TextCondition] | None = None):
        self.decoder, self.prior, self.upsamplers, self.text_encoder = decoder, prior, list(upsamplers), text_encoder
        size = decoder.config.image_size
        for i, up in enumerate(self.upsamplers):
            if up.config.low_res_size != size:
                raise ValueError(f"upsamplers[{i}] expects {up.config.low_res_size}px input but the previous stage makes {size}px")
            size = up.config.image_size

    @torch.no_grad()
    def use_empty_caption_as_null(self) -> None:
        """Make the prior's and the decoder's null condition the text encoder's encoding of the
        empty caption: the unconditional branch of diffusers' UnCLIPPipeline (Karlo). Use it with
        Karlo weights and `clip_text_encoder(clip, normalize=False)`."""
        if self.text_encoder is None:
            raise ValueError("UnCLIP has no text_encoder to encode the empty caption with")
        empty = self.text_encoder([""])
        mask = empty.mask[0] if empty.mask is not None else None
        for stage in (self.prior, self.decoder):
            if hasattr(stage, "set_null_condition"):
                stage.set_null_condition(empty.emb[0], empty.states[0], mask)

    # -- stages ----------------------------------------------------------------------------------

    def encode_text(self, captions: Sequence[str] | TextCondition) -> TextCondition:
        if isinstance(captions, TextCondition):
            return captions
        if self.text_encoder is None:
            raise ValueError("captions given as strings but UnCLIP has no text_encoder; pass a TextCondition")
        return self.text_encoder([captions] if isinstance(captions, str) else list(captions))

    def sample_image_emb(self, text: TextCondition, generator=None, **prior_kwargs) -> torch.Tensor:
        if self.prior is None:
            raise ValueError("UnCLIP has no prior: pass one, or decode an embedding directly (decode)")
        return self.prior.sample(text.emb, text.states, text.mask, generator=generator, **prior_kwargs)

    def upsample(self, image: torch.Tensor, stages: Sequence[Stage] | None = None, generator=None) -> torch.Tensor:
        stages = list(stages) if stages is not None else [DEFAULT_UPSAMPLER] * len(self.upsamplers)
        if len(stages) != len(self.upsamplers):
            raise ValueError(f"{len(stages)} upsampler stages given for {len(self.upsamplers)} upsamplers")
        for up, st in zip(self.upsamplers, stages):
            image = up.sample(image, steps=st.steps, sampler=st.sampler, eta=st.eta, generator=generator)
        return image

    @torch.no_grad()
    def decode(self, image_emb: torch.Tensor, text: TextCondition | None = None, *, decoder: Stage = DEFAULT_DECODER,
               upsamplers: Sequence[Stage] | None = None, x_T: torch.Tensor | None = None,
               generator: torch.Generator | None = None, upsample: bool = True) -> torch.Tensor:
        """z_i (+ optional caption) -> image; x_T fixes the decoder's start noise."""
        t = text or TextCondition(None, None, None)
        image = self.decoder.sample(image_emb, t.emb, t.states, t.mask, steps=decoder.steps, sampler=decoder.sampler,
                                    eta=decoder.eta, guidance_scale=decoder.guidance_scale, generator=generator, x_T=x_T,
                                    clip_sample=decoder.clip_sample)
        return self.upsample(image, upsamplers, generator) if upsample else image

    @torch.no_grad()
    def sample(self, captions: Sequence[str] | TextCondition, *, generator: torch.Generator | None = None,
               prior: dict | None = None, decoder: Stage = DEFAULT_DECODER, upsamplers: Sequence[Stage] | None = None,
               use_caption: bool = True, return_image_emb: bool = False):
        """Text to image. prior: keyword arguments of prior.sample (e.g. KARLO_DIFFUSION_PRIOR, or
        steps/guidance_scale/candidates; temperature/dot_bucket for the AR prior); use_caption: also give the caption to the decoder (it helps little)."""
        text = self.encode_text(captions)
        z_i = self.sample_image_emb(text, generator, **(prior or {}))
        image = self.decode(z_i, text if use_caption else None, decoder=decoder, upsamplers=upsamplers, generator=generator)
        return (image, z_i) if return_image_emb else image

    @torch.no_grad()
    def sample_from_text_emb(self, captions: Sequence[str] | TextCondition, **kwargs) -> torch.Tensor:
        """Section 5.1's zero-shot baseline: the text embedding z_t fed to the decoder as if it
        were an image embedding (no prior)."""
        text = self.encode_text(captions)
        return self.decode(text.emb, text, **kwargs)

    def reconstruct(self, image_emb: torch.Tensor, **kwargs) -> torch.Tensor:
        """Decode an image's own CLIP embedding (its z_i)."""
        return self.decode(image_emb, **kwargs)

    # -- section 3 manipulations -----------------------------------------------------------------

    @torch.no_grad()
    def invert(self, images: torch.Tensor, image_emb: torch.Tensor, text: TextCondition | None = None, *,
               steps: int = 50, guidance_scale: float = 1.0) -> torch.Tensor:
        """x_T of images (B, C, H, W) in [-1, 1], resized to the decoder's size, given their z_i.
        Decoding (z_i, x_T) with eta=0 and the same steps and guidance reconstructs them."""
        size = self.decoder.config.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = downsample_to(images, size)
        t = text or TextCondition(None, None, None)
        return self.decoder.invert(images, image_emb, t.emb, t.states, t.mask, steps=steps, guidance_scale=guidance_scale)

    def variations(self, image_emb: torch.Tensor, x_T: torch.Tensor, n: int = 4, *, eta: float = 1.0, steps: int = 50,
                   guidance_scale: float = 1.0, generator=None, **kwargs) -> torch.Tensor:
        """n variations per input, (B*n, ...): decode (z_i, x_T) with DDIM eta > 0 (eta=0 gives
        back the inverted image n times)."""
        stage = Stage(steps=steps, sampler="ddim", eta=eta, guidance_scale=guidance_scale, clip_sample=None)
        return self.decode(image_emb.repeat_interleave(n, 0), decoder=stage, x_T=x_T.repeat_interleave(n, 0),
                           generator=generator, **kwargs)

    def interpolate(self, emb_a: torch.Tensor, emb_b: torch.Tensor, thetas: Sequence[float], *,
                    x_T_a: torch.Tensor | None = None, x_T_b: torch.Tensor | None = None, x_T: torch.Tensor | None = None,
                    steps: int = 50, guidance_scale: float = 1.0, generator=None, **kwargs) -> torch.Tensor:
        """Frames (len(thetas), ...) between two single images' z_i (each (1, D) or (D,)).
        With x_T_a and x_T_b (their inversions) the x_T's are slerped too, so the ends reconstruct
        the inputs; otherwise one x_T (given, or drawn from `generator`) is shared by all frames."""
        emb_a, emb_b = emb_a.reshape(1, -1), emb_b.reshape(1, -1)
        n = len(thetas)
        th = torch.as_tensor(list(thetas), dtype=emb_a.dtype, device=emb_a.device)
        z = slerp(emb_a.expand(n, -1), emb_b.expand(n, -1), th)
        if (x_T_a is None) != (x_T_b is None):
            raise ValueError("give both x_T_a and x_T_b (slerped x_T) or neither (a fixed x_T)")
        if x_T_a is not None:
            noise = slerp_images(x_T_a.expand(n, *x_T_a.shape[1:]), x_T_b.expand(n, *x_T_b.shape[1:]), th)
        else:
            noise = x_T if x_T is not None else self._noise(1, generator)
            noise = noise.expand(n, *noise.shape[1:])
        stage = Stage(steps=steps, sampler="ddim", eta=0.0, guidance_scale=guidance_scale,
                      clip_sample=None if x_T_a is not None else 1.0)  # inverted x_T: decode exactly
        return self.decode(z, decoder=stage, x_T=noise.contiguous(), generator=generator, **kwargs)

    def text_diff(self, image_emb: torch.Tensor, x_T: torch.Tensor, text: TextCondition, base_text: TextCondition,
                  thetas: Sequence[float], *, steps: int = 50, guidance_scale: float = 1.0, generator=None,
                  **kwargs) -> torch.Tensor:
        """Frames slerp(z_i, norm(z_t - z_t0), theta) for one image (paper: theta up to ~0.25-0.5),
        all decoded from the image's fixed x_T."""
        n = len(thetas)
        th = torch.as_tensor(list(thetas), dtype=image_emb.dtype, device=image_emb.device)
        z = text_diff(image_emb.reshape(1, -1).expand(n, -1), text.emb.reshape(1, -1).expand(n, -1),
                      base_text.emb.reshape(1, -1).expand(n, -1), th)
        stage = Stage(steps=steps, sampler="ddim", eta=0.0, guidance_scale=guidance_scale, clip_sample=None)
        return self.decode(z, decoder=stage, x_T=x_T.expand(n, *x_T.shape[1:]).contiguous(), generator=generator, **kwargs)

    def pca_probe(self, image_emb: torch.Tensor, basis: PcaBasis, ks: Sequence[int], *,
                  seed: int = 0, steps: int = 50, guidance_scale: float = 1.0, **kwargs) -> torch.Tensor:
        """Section 4: one image's z_i rebuilt from its first k PCA dims for each k, decoded with
        the same DDIM seed (x_T and any stage noise), (len(ks), ...)."""
        z = torch.cat([pca_reconstruct(image_emb.reshape(1, -1), basis, k) for k in ks])
        gen = torch.Generator().manual_seed(seed)
        noise = self._noise(1, gen).expand(len(ks), -1, -1, -1).contiguous()
        stage = Stage(steps=steps, sampler="ddim", eta=0.0, guidance_scale=guidance_scale)
        return self.decode(z, decoder=stage, x_T=noise, generator=gen, **kwargs)

    def _noise(self, n: int, generator=None) -> torch.Tensor:
        cfg = self.decoder.config
        device = next(self.decoder.parameters()).device
        return diffusion.randn((n, cfg.in_channels, cfg.image_size, cfg.image_size), generator, device=device)
