"""CLIP encoders for unCLIP, on top of open_clip (pure PyTorch: no Ray, no MLflow).

Three ways to get a model, all through `load_clip`:

    load_clip("ViT-L-14", pretrained="openai")                 # a named open_clip model + tag
    load_clip("ViT-B-32", pretrained="/data/vitb32.safetensors")  # a named architecture, local weights
    load_clip(arch=TINY_CLIP_ARCH)                             # a custom architecture dict (or JSON
                                                               # file), random init unless `pretrained`

What unCLIP needs from CLIP, exposed on `ClipEncoder`:

- `encode_image(images)` / `encode_text(tokens)`: L2-normalised embeddings z_i, z_t.
- `encode_text_with_hidden(tokens)`: z_t plus the per-token hidden states of the text tower (the
  output of its final LayerNorm, `ln_final`, before pooling and projection) that the prior and the
  decoder condition on.
- `tokenize(captions)` / `decode_tokens(tokens)`, `context_length`, `embed_dim`, `text_width`.
- `preprocess` (PIL → normalised float tensor, open_clip's eval transform), split into
  `preprocess_uint8` (PIL → resized, cropped RGB uint8 array, HWC) and `normalize` (uint8 batch →
  float tensor) so that decoding and resizing can run apart from the encoder.

Training a CLIP: `ClipModel` (a trainable open_clip model checkpointed from its `ClipConfig`) and
its objective `training_loss` (open_clip's contrastive `ClipLoss`, exact under data parallelism).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from copy import deepcopy
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from models.clip_preprocess import ImagePreprocessor, import_open_clip

open_clip = import_open_clip()
from open_clip.loss import ClipLoss
from open_clip.transformer import TextTransformer, text_global_pool

from models.checkpoint import register
from models.objective import Field, check_batch, data_parallel, detached

# A tiny open_clip architecture for tests and the demo (about 3.5M parameters, 1.6M of which are the
# token embedding of the standard 49408-token BPE vocabulary). 32 px images, 32 text tokens.
TINY_CLIP_ARCH: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


class ClipError(RuntimeError):
    """A CLIP model could not be built or loaded; the message says what to change."""


class ClipWeightsUnavailable(ClipError):
    """Pretrained weights are neither cached locally nor downloadable (e.g. offline)."""


def _read_arch(arch: dict | str | os.PathLike) -> dict:
    if isinstance(arch, dict):
        cfg = deepcopy(arch)
    else:
        path = Path(arch)
        if not path.is_file():
            raise ClipError(f"CLIP architecture file {path} does not exist; pass an open_clip model config "
                            "dict or a JSON file with keys embed_dim, vision_cfg, text_cfg")
        try:
            cfg = json.loads(path.read_text())
        except ValueError as e:
            raise ClipError(f"CLIP architecture file {path} is not valid JSON: {e}") from e
    cfg = cfg.get("model_cfg", cfg)  # accept open_clip's open_clip_config.json layout too
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(cfg)
    if missing:
        raise ClipError(f"CLIP architecture config lacks {sorted(missing)}; an open_clip model config has "
                        "embed_dim, vision_cfg and text_cfg (see models.clip.TINY_CLIP_ARCH)")
    return cfg


def _weights_hint(model_name: str, pretrained: str) -> str:
    return (
        f"Pretrained CLIP weights {model_name!r}/{pretrained!r} are not in the local cache and could not be "
        "downloaded (offline?). Either download them once on a machine with internet access, e.g. "
        f"`python -c \"import open_clip; open_clip.create_model('{model_name}', pretrained='{pretrained}')\"` "
        "(they land in the Hugging Face cache, ~/.cache/huggingface, or HF_HOME), and copy that cache here; "
        "or save the state dict as a .safetensors file and set the CLIP `pretrained` option to its path, "
        f"e.g. pretrained: /models/{model_name}.safetensors."
    )


def _clip_from_arch(arch: dict | str | os.PathLike, precision: str = "fp32",
                    mean: Sequence[float] = open_clip.OPENAI_DATASET_MEAN,
                    std: Sequence[float] = open_clip.OPENAI_DATASET_STD) -> torch.nn.Module:
    """A randomly initialised open_clip model of the architecture config, with its eval preprocessing."""
    cfg = _read_arch(arch)
    custom_text = bool(cfg.pop("custom_text", False))
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        model = cls(**cfg, cast_dtype=open_clip.get_cast_dtype(precision))
    except TypeError as e:
        raise ClipError(f"invalid CLIP architecture config: {e}") from e
    open_clip.set_model_preprocess_cfg(model, {
        "size": model.visual.image_size, "mode": "RGB", "mean": tuple(mean), "std": tuple(std),
        "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0})
    return model


def _build_model(model_name: str | None, pretrained: str | None, arch: dict | str | os.PathLike | None,
                 device: str | torch.device, precision: str, context_length: int | None) -> torch.nn.Module:
    if pretrained is not None and pretrained.endswith((".pt", ".pth", ".bin", ".ckpt")) and Path(pretrained).exists():
        raise ClipError(f"{pretrained}: refusing to load a pickled checkpoint; convert it to safetensors once "
                        "(`safetensors.torch.save_file(state_dict, 'model.safetensors')`) and pass that path")
    if arch is not None:
        cfg = _read_arch(arch)
        if context_length is not None:
            cfg["text_cfg"]["context_length"] = context_length
        model = _clip_from_arch(cfg, precision)
        if pretrained is not None:
            if not Path(pretrained).is_file():
                raise ClipError(f"CLIP weights file {pretrained} does not exist (with a custom `arch`, "
                                "`pretrained` must be a local .safetensors file or unset for random init)")
            try:
                open_clip.load_checkpoint(model, pretrained, strict=True)
            except RuntimeError as e:
                raise ClipError(f"CLIP weights {pretrained} do not match the architecture config: {e}") from e
        model.to(device)
        if precision in ("fp16", "bf16"):
            model.to(torch.float16 if precision == "fp16" else torch.bfloat16)
        return model

    if not model_name:
        raise ClipError("give a CLIP model name (e.g. 'ViT-L-14') or a custom `arch` config")
    name = model_name.replace("/", "-")
    if open_clip.get_model_config(name) is None and not name.startswith(("hf-hub:", "local-dir:")):
        raise ClipError(f"unknown open_clip model {model_name!r}; known names: {', '.join(open_clip.list_models())}")
    text_cfg = (open_clip.get_model_config(name) or {}).get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name"):
        raise ClipError(f"{model_name!r} uses a Hugging Face tokenizer/text model; this pipeline supports open_clip "
                        "models with the OpenAI BPE tokenizer (ViT-B-32, ViT-L-14, ViT-H-14, ViT-bigG-14, ...)")
    is_tag = pretrained is not None and open_clip.get_pretrained_cfg(name, pretrained) != {}
    if pretrained is not None and not is_tag and not Path(pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ClipError(f"CLIP pretrained={pretrained!r} for {model_name!r} is neither a known tag ({tags}) "
                        "nor an existing local weights file")
    try:
        return open_clip.create_model(name, pretrained=pretrained, device=device, precision=precision,
                                      force_context_length=context_length, weights_only=True)
    except RuntimeError as e:
        if is_tag and "download" in str(e).lower():
            raise ClipWeightsUnavailable(_weights_hint(model_name, pretrained)) from e
        raise ClipError(f"could not build CLIP {model_name!r} with pretrained={pretrained!r}: {e}") from e


class ClipEncoder(torch.nn.Module):
    """A frozen open_clip model with the calls unCLIP needs. Build it with `load_clip`."""

    def __init__(self, model: torch.nn.Module, name: str = "clip"):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.embed_dim: int = int(self._embed_dim())
        self.context_length: int = int(model.context_length)
        self.tokenizer = open_clip.SimpleTokenizer(context_length=self.context_length)
        cfg = open_clip.get_model_preprocess_cfg(model)
        self.image_preprocessor = ImagePreprocessor(cfg)
        self.preprocess_cfg: dict[str, Any] = self.image_preprocessor.cfg
        self.image_size: int = self.image_preprocessor.image_size
        size = cfg["size"]
        self.preprocess: Callable[[Image.Image], torch.Tensor] = open_clip.image_transform(
            tuple(size) if isinstance(size, list) else size, is_train=False, mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]), resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"),
            fill_color=cfg.get("fill_color", 0))
        self.register_buffer("mean", torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def _embed_dim(self) -> int:
        visual = self.model.visual
        if getattr(visual, "output_dim", None):
            return visual.output_dim
        with torch.no_grad():
            return self.model.encode_text(torch.zeros(1, self.model.context_length, dtype=torch.long)).shape[-1]

    @property
    def text_width(self) -> int:
        return int(self.model.ln_final.normalized_shape[0] if hasattr(self.model, "ln_final")
                   else self.model.text.ln_final.normalized_shape[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- images -----------------------------------------------------------------------------
    def preprocess_uint8(self, image: Image.Image) -> np.ndarray:
        """Resize + center-crop + RGB, as open_clip's eval transform does; (H, W, 3) uint8."""
        return self.image_preprocessor(image)

    def normalize(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 → (B, 3, H, W) float, normalised like open_clip's ToTensor + Normalize."""
        if isinstance(images, np.ndarray) and not images.flags.writeable:
            images = images.copy()  # torch warns on read-only arrays (e.g. zero-copy from Arrow)
        x = torch.as_tensor(images).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised float images → (B, embed_dim) unit-norm float32."""
        dtype = next(self.model.visual.parameters()).dtype
        return F.normalize(self.model.encode_image(images.to(self.device, dtype)).float(), dim=-1)

    # --- text -------------------------------------------------------------------------------
    def tokenize(self, captions: str | Sequence[str]) -> torch.Tensor:
        """(B, context_length) int64 BPE tokens, truncated to the context (end token kept)."""
        return self.tokenizer([captions] if isinstance(captions, str) else list(captions))

    def decode_tokens(self, tokens: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        """Inverse of `tokenize` for one row (start/end/padding tokens dropped)."""
        ids = [int(t) for t in np.asarray(tokens).reshape(-1)]
        sot, eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        ids = [t for t in ids if t not in (0, sot)]
        if eot in ids:
            ids = ids[: ids.index(eot)]
        return self.tokenizer.decode(ids).strip()

    @torch.no_grad()
    def encode_text_with_hidden(self, tokens: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(text embedding (B, embed_dim), final-LayerNorm hidden states (B, L, text_width)); the
        embedding is unit-norm, or with normalize=False the raw projection (what Karlo's prior and
        decoder take: diffusers' CLIPTextModelWithProjection `text_embeds`).

        Follows open_clip's `CLIP.encode_text`: token + positional embedding, causal transformer,
        `ln_final`; the embedding is the pooled (argmax = end token) state times `text_projection`.
        """
        m = self.model
        tokens = tokens.to(self.device)
        if isinstance(m, open_clip.CLIP):
            pooled, hidden = self._clip_text(tokens)
        elif isinstance(getattr(m, "text", None), TextTransformer) and m.text.cls_emb is None:
            text = m.text
            previous, text.output_tokens = text.output_tokens, True
            try:
                pooled, hidden = text(tokens)
            finally:
                text.output_tokens = previous
        else:
            raise ClipError(f"per-token text states are not supported for {type(m).__name__} text towers "
                            "(supported: open_clip CLIP and CustomTextCLIP with a TextTransformer)")
        pooled = pooled.float()
        return (F.normalize(pooled, dim=-1) if normalize else pooled), hidden.float()

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens → (B, embed_dim) unit-norm float32 text embeddings.

        The same numbers as open_clip's `encode_text`, but a causal text tower pooled at the end
        token runs only up to the batch's last end token: the padding after it cannot reach the
        pooled state, and a typical caption is ~15 of 77 positions (5-8x less text compute)."""
        tokens = tokens.to(self.device)
        m = self.model
        if not (isinstance(m, open_clip.CLIP) and m.attn_mask is not None and m.text_pool_type in ("argmax", "eos")):
            return F.normalize(m.encode_text(tokens).float(), dim=-1)
        if m.text_pool_type == "argmax":
            pooled_at = tokens.argmax(dim=-1)
        else:
            pooled_at = (tokens == m.text_eos_id).int().argmax(dim=-1)
        return F.normalize(self._clip_text(tokens[:, : int(pooled_at.max()) + 1])[0].float(), dim=-1)

    def _clip_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """open_clip `CLIP.encode_text` on the first L positions: (projected pooled state, ln_final states)."""
        m = self.model
        length = tokens.shape[1]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:length].to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length] if m.attn_mask is not None else None)
        hidden = m.ln_final(x)
        pooled = text_global_pool(hidden, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        proj = m.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
        return pooled, hidden

    @torch.no_grad()
    def text_hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_text_with_hidden(tokens)[1]


def load_clip(model_name: str | None = None, pretrained: str | None = None, *,
              arch: dict | str | os.PathLike | None = None, device: str | torch.device = "cpu",
              precision: str = "fp32", context_length: int | None = None) -> ClipEncoder:
    """Build a frozen `ClipEncoder`.

    model_name + pretrained tag: open_clip's weights (downloaded or from the HF cache);
    model_name + pretrained path: a local weights file (.safetensors; pickles are refused);
    arch (dict or JSON file): a custom open_clip architecture, random init unless `pretrained` is a path.
    """
    model = _build_model(model_name, pretrained, arch, device, precision, context_length)
    label = "custom" if arch is not None else model_name
    return ClipEncoder(model, name=f"{label}/{pretrained or 'random'}")


def describe_clip(model_name: str | None = None, pretrained: str | None = None, *,
                  arch: dict | str | os.PathLike | None = None, context_length: int | None = None) -> dict[str, Any]:
    """{"embed_dim", "context_length", "preprocess_cfg"} of the encoder `load_clip` would build, without
    loading or even allocating weights (the architecture is built on the meta device)."""
    from open_clip.transform import merge_preprocess_dict

    if model_name and str(model_name).startswith(("hf-hub:", "local-dir:")):
        raise ClipError(f"describe_clip needs a built-in model name or an arch, not {model_name!r}")
    with torch.device("meta"):
        encoder = load_clip(model_name, None, arch=arch, device="meta", context_length=context_length)
    cfg = dict(encoder.preprocess_cfg)
    if arch is None and pretrained is not None:
        tag_cfg = open_clip.get_pretrained_cfg(model_name.replace("/", "-"), pretrained)
        if tag_cfg:  # a named tag brings its own normalisation (e.g. SigLIP's 0.5 mean/std)
            size = cfg["size"]
            cfg = merge_preprocess_dict(cfg, tag_cfg)
            cfg["size"] = size
    return {"embed_dim": encoder.embed_dim, "context_length": encoder.context_length,
            "preprocess_cfg": ImagePreprocessor(cfg).cfg}


def save_clip_weights(encoder: ClipEncoder, path: str | os.PathLike) -> Path:
    """Write the open_clip state dict as safetensors (loadable with `load_clip(..., pretrained=path)`)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    return path


# --- training a CLIP (a `train_clip` stage) ------------------------------------------------------


@dataclass
class ClipConfig:
    """arch: an open_clip model config (embed_dim, vision_cfg, text_cfg, optional quick_gelu,
    custom_text, ...), as in open_clip's model_configs/*.json; image_mean/std: the normalisation
    the network applies to its [-1, 1] input images (OpenAI's by default)."""

    arch: dict
    image_mean: list[float] = field(default_factory=lambda: list(open_clip.OPENAI_DATASET_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(open_clip.OPENAI_DATASET_STD))

    def __post_init__(self):
        self.arch = _read_arch(self.arch)
        self.image_mean, self.image_std = [float(v) for v in self.image_mean], [float(v) for v in self.image_std]
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ClipError(f"ClipConfig.image_mean/image_std must have 3 values (RGB), got {self.image_mean}, {self.image_std}")


# tiny: tests and the demo (TINY_CLIP_ARCH, 32 px). small/base/paper: open_clip's ViT-B/32, ViT-L/14
# (the OpenAI model Karlo uses) and ViT-H/16 (the paper's CLIP, appendix C).
SIZES: dict[str, ClipConfig] = {
    "tiny": ClipConfig(TINY_CLIP_ARCH),
    "small": ClipConfig(open_clip.get_model_config("ViT-B-32")),
    "base": ClipConfig(open_clip.get_model_config("ViT-L-14")),
    "paper": ClipConfig(open_clip.get_model_config("ViT-H-16")),
}


@register("clip.ClipModel", format_version=1)
class ClipModel(torch.nn.Module):
    """A trainable open_clip model (`self.model`), checkpointed by models.checkpoint from its
    architecture config. forward(image in [-1, 1], text_tokens) -> (unit-norm image features,
    unit-norm text features, logit scale exp(s)); `encoder()` gives the frozen ClipEncoder of a copy."""

    config_class = ClipConfig

    def __init__(self, config: ClipConfig):
        super().__init__()
        self.config = config
        self.model = _clip_from_arch(config.arch, mean=config.image_mean, std=config.image_std)
        if getattr(self.model, "logit_bias", None) is not None:
            raise ClipError("CLIP arch has init_logit_bias (SigLIP): its loss is not the contrastive ClipLoss trained here")
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor, text_tokens: torch.Tensor):
        x = ((image + 1) / 2 - self.image_mean) / self.image_std  # [-1, 1] -> CLIP's normalisation
        image_features, text_features, logit_scale = self.model(x, text_tokens)
        return image_features, text_features, logit_scale

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """open_clip's training clamps the learned temperature: exp(logit_scale) <= 100."""
        self.model.logit_scale.clamp_(0, math.log(100))

    def encoder(self) -> ClipEncoder:
        return ClipEncoder(deepcopy(self.model), name="trained")


BATCH: dict[str, Field] = {
    "image": Field("float", ("B", 3, "H", "W"), doc="images in [-1, 1] at the CLIP's image size (normalised inside)"),
    "text_tokens": Field("long", ("B", "L"), doc="BPE token ids of the captions (ClipEncoder.tokenize), 0-padded"),
}


def training_loss(network: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None):
    """open_clip's contrastive ClipLoss (symmetric cross-entropy over the logit-scaled cosine
    similarities of the global batch). Deterministic: `generator` is unused.

    Data parallel: features are gathered from every rank with gradient (`gather_with_grad=True`:
    the all-gather's backward sums each rank's gradient into the features' owner) and each rank
    scores its own rows against all columns (`local_loss=True`, labels offset by rank). The mean
    over ranks of the local losses is the loss of the global batch and DDP's averaged gradient is
    its gradient, so W ranks x batch b step exactly as 1 process x batch W*b. (Without
    gather_with_grad, local_loss=False gives 1/W of that gradient and local_loss=True drops the
    gradient through other ranks' negatives.) Metrics: loss, accuracy (image -> text top-1 of this
    rank's rows among the global batch), logit_scale."""
    check_batch(BATCH, batch, "clip")
    image_features, text_features, logit_scale = network(batch["image"], batch["text_tokens"])
    # Gather only when this forward is one rank's shard of a global batch (a DDP/FSDP network): a
    # bare module evaluated on one rank (validation of the EMA) must not wait for the others.
    distributed = data_parallel(network) and dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    contrastive = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    # ClipLoss.forward's computation, with its logits kept for the accuracy
    logits_per_image, logits_per_text = contrastive.get_logits(image_features, text_features, logit_scale)
    labels = contrastive.get_ground_truth(image_features.device, logits_per_image.shape[0])
    logits_per_image, logits_per_text = logits_per_image.float(), logits_per_text.float()
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    accuracy = (logits_per_image.argmax(-1) == labels).float().mean()
    return loss, detached(loss=loss, accuracy=accuracy, logit_scale=logit_scale)
