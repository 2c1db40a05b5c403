"""Autoregressive prior P(z_i | y) (paper section 2.2), pure PyTorch.

z_i is reduced with PCA to its first k components (ordered by decreasing eigenvalue; the paper
keeps 319 of 1024: `kept_dims`), each coefficient is quantised into `num_buckets` quantile buckets (paper: 1024),
and a causal transformer predicts the k bucket tokens one after the other. The prefix is

    [z_t, caption token states (text_len), quantised z_i.z_t token] -> x_1 ... x_k

(z_t first: its row is never padding, so no attention row is fully masked). The dot-product token
is what lets sampling ask for a high z_i.z_t: by default it is drawn from the top half of the
training distribution, which worked best in the paper. The text condition (z_t, token states and
the dot token, which depends on z_t) is replaced by learned null states `text_drop_prob` of the
time (10% in the paper) so sampling can use classifier-free guidance on the logits.

The PCA basis and its quantisation are `models.pca.PcaBasis` (fitted by `models.pca.fit_pca` or
by the pca stage, loaded by `tasks.schema.load_pca`); `ARPrior.from_basis` builds a model sized by
it. Its kept part lives in the model's buffers, so a checkpoint is self-contained. A basis without
the z_i.z_t bucket edges builds a model that refuses to train or sample (the dot token would mean
nothing), with an error that says how to get them.

Sampling keeps each layer's keys and values (`KVCache`): the prefix runs once, then each new
token runs one position against the cache instead of the whole sequence again; with guidance the
conditional and null-condition rows share one batch. `sample(use_cache=False)` is the plain path
(the whole sequence through `nn.TransformerEncoder` at every step), kept as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from models.checkpoint import migration, register
from models.objective import Field, bernoulli, check_batch, detached, unwrap
from models.pca import NO_DOT_EDGES, PcaBasis
from models.prior import pad_caption


@dataclass
class ARPriorConfig:
    embed_dim: int = 768  # CLIP embedding width (z_i and z_t)
    text_dim: int = 768  # caption token state width
    text_len: int = 77
    kept_dims: int = 319  # k kept PCA components (paper: 319 of 1024)
    num_buckets: int = 1024  # quantisation buckets per PCA dimension (paper: 1024)
    similarity_buckets: int = 64  # buckets of z_i.z_t for the conditioning token (pca stage default)
    width: int = 768
    num_heads: int = 12
    num_layers: int = 12
    dropout: float = 0.0
    text_drop_prob: float = 0.1

    def __post_init__(self):
        for name in ("embed_dim", "text_dim", "text_len", "kept_dims", "width", "num_heads", "num_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ARPriorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_buckets < 2 or self.similarity_buckets < 2:
            raise ValueError(f"ARPriorConfig.num_buckets and similarity_buckets must be >= 2, got {self.num_buckets}, {self.similarity_buckets}")
        if self.kept_dims > self.embed_dim:
            raise ValueError(f"ARPriorConfig.kept_dims={self.kept_dims} exceeds embed_dim={self.embed_dim}")
        if self.width % self.num_heads:
            raise ValueError(f"ARPriorConfig.width={self.width} is not divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.text_drop_prob < 1.0:
            raise ValueError(f"ARPriorConfig.text_drop_prob must be in [0, 1), got {self.text_drop_prob}")


# tiny: tests/demo. small: CPU-trainable. base: a ViT-L/14-sized AR prior of ~1B-class depth is
# only described here (width 2048, 20 layers, ~1B). paper: 1B, ViT-H/16 (1024-d), 319 dims x 1024 buckets.
SIZES: dict[str, ARPriorConfig] = {
    "tiny": ARPriorConfig(embed_dim=32, text_dim=32, text_len=8, kept_dims=16, num_buckets=64, similarity_buckets=8, width=64, num_heads=4, num_layers=2),
    "small": ARPriorConfig(embed_dim=512, text_dim=512, text_len=77, kept_dims=128, num_buckets=256, similarity_buckets=32, width=512, num_heads=8, num_layers=6),
    "base": ARPriorConfig(embed_dim=768, text_dim=768, text_len=77, kept_dims=319, num_buckets=1024, similarity_buckets=64, width=2048, num_heads=32, num_layers=20),
    "paper": ARPriorConfig(embed_dim=1024, text_dim=1024, text_len=77, kept_dims=319, num_buckets=1024, similarity_buckets=64, width=2048, num_heads=32, num_layers=20),
}


@register("prior.ARPrior", format_version=2)
class ARPrior(nn.Module):
    config_class = ARPriorConfig

    @classmethod
    def from_basis(cls, basis: PcaBasis, size: str = "tiny", **overrides) -> "ARPrior":
        """A model of a named size whose PCA/bucket shapes come from the basis."""
        from models.sizes import config_for  # sizes imports this module

        if not isinstance(basis, PcaBasis):
            raise TypeError(f"{type(basis).__name__} is not a models.pca.PcaBasis (load one with tasks.schema.load_pca)")
        shapes = dict(embed_dim=basis.dim, kept_dims=basis.kept_dims, num_buckets=basis.num_buckets)
        if basis.dot_edges is not None:
            shapes["similarity_buckets"] = basis.similarity_buckets
        return cls(config_for("ar_prior", size, **{**shapes, **overrides}), basis)

    def __init__(self, config: ARPriorConfig, basis: PcaBasis | None = None):
        super().__init__()
        self.config = c = config
        # The kept PCA basis lives in buffers (saved with the checkpoint): zero edges until set.
        # Dot edges stay zero until fitted ones are set (there is no sensible default).
        self.register_buffer("pca_mean", torch.zeros(c.embed_dim))
        self.register_buffer("pca_components", torch.zeros(c.kept_dims, c.embed_dim))
        self.register_buffer("pca_explained_variance", torch.zeros(c.kept_dims))
        self.register_buffer("bucket_edges", torch.zeros(c.kept_dims, c.num_buckets + 1))
        self.register_buffer("dot_edges", torch.zeros(c.similarity_buckets + 1))
        self._basis_state: tuple[bool, bool] | None = None  # (has basis, has dot edges), read once
        self.register_load_state_dict_post_hook(ARPrior._forget_basis_state)
        if basis is not None:
            self.set_basis(basis)

        self.text_emb_in = nn.Linear(c.embed_dim, c.width)
        self.text_states_in = nn.Linear(c.text_dim, c.width)
        self.dot_embed = nn.Embedding(c.similarity_buckets, c.width)
        self.token_embed = nn.Embedding(c.num_buckets, c.width)  # shared; position says which PCA dim
        self.seq_len = 1 + c.text_len + 1 + c.kept_dims - 1  # the last token is predicted, never read
        self.pos_embed = nn.Parameter(torch.randn(self.seq_len, c.width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            c.width, c.num_heads, 4 * c.width, c.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, c.num_layers, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, c.num_buckets)
        # Null condition for classifier-free guidance: z_t, token states and dot token together.
        self.null_text_emb = nn.Parameter(torch.zeros(c.embed_dim))
        self.null_text_states = nn.Parameter(torch.zeros(c.text_len, c.text_dim))
        self.null_dot = nn.Parameter(torch.zeros(c.width))
        self.register_buffer("causal_mask", torch.ones(self.seq_len, self.seq_len, dtype=torch.bool).triu(1), persistent=False)

    # ----- PCA and tokens -----
    @torch.no_grad()
    def set_basis(self, basis: PcaBasis) -> None:
        c = self.config
        if not isinstance(basis, PcaBasis):
            raise TypeError(f"{type(basis).__name__} is not a models.pca.PcaBasis (load one with tasks.schema.load_pca)")
        basis.validate()
        if basis.bucket_edges is None or (basis.dim, basis.kept_dims, basis.num_buckets) != (c.embed_dim, c.kept_dims, c.num_buckets):
            got = "no bucket edges" if basis.bucket_edges is None else f"dim {basis.dim}, {basis.kept_dims} kept dims, {basis.num_buckets} buckets"
            raise ValueError(f"PcaBasis has {got}; this AR prior wants dim {c.embed_dim}, {c.kept_dims} kept dims, {c.num_buckets} buckets")
        if basis.dot_edges is not None and basis.similarity_buckets != c.similarity_buckets:
            raise ValueError(f"PcaBasis has {basis.similarity_buckets} similarity buckets; this AR prior wants {c.similarity_buckets}")
        kept = basis.kept()
        self.pca_mean.copy_(kept.mean)
        self.pca_components.copy_(kept.components)
        self.pca_explained_variance.copy_(kept.explained_variance)
        self.bucket_edges.copy_(kept.bucket_edges)
        if kept.dot_edges is None:
            self.dot_edges.zero_()
        else:
            self.dot_edges.copy_(kept.dot_edges)
        self._basis_state = None

    @staticmethod
    def _forget_basis_state(module: "ARPrior", incompatible_keys) -> None:
        module._basis_state = None

    def _require_basis(self, dot_edges: bool = False) -> None:
        """Clear errors for a model without a basis or without dot edges; one device read per
        load, not per step."""
        if self._basis_state is None:
            self._basis_state = (bool(self.bucket_edges.any()), bool(self.dot_edges.any()))
        if not self._basis_state[0]:
            raise RuntimeError("this ARPrior has no PCA basis: pass basis= to the constructor, call set_basis(), or load a checkpoint")
        if dot_edges and not self._basis_state[1]:
            raise RuntimeError(f"ARPrior: {NO_DOT_EDGES}; then pass it to ARPrior.from_basis or set_basis")

    @property
    def basis(self) -> PcaBasis:
        """The kept PCA basis (views of the buffers); dot_edges None until fitted ones are set."""
        self._require_basis()
        dot_edges = self.dot_edges if self._basis_state[1] else None
        return PcaBasis(self.pca_mean, self.pca_components, self.pca_explained_variance, self.bucket_edges, dot_edges)

    def tokenize(self, image_emb: torch.Tensor) -> torch.Tensor:
        """z_i [B, D] -> bucket tokens [B, k] of the first k PCA coefficients."""
        if image_emb.ndim != 2 or image_emb.shape[1] != self.config.embed_dim:
            raise ValueError(f"image_emb must be [batch, {self.config.embed_dim}], got {tuple(image_emb.shape)}")
        return self.basis.quantize(image_emb)

    def detokenize(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Tokens [B, k] -> bucket centres -> inverse PCA -> z_i [B, D] (L2-normalised by default)."""
        return self.basis.dequantize(tokens, normalize=normalize)

    def dot_tokens(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """The conditioning token: z_i.z_t in the fitted quantile buckets."""
        self._require_basis(dot_edges=True)
        return self.basis.quantize_dot((image_emb * text_emb).sum(-1))

    # ----- network -----
    def prepare_text(self, text_states, text_mask):
        return pad_caption(text_states, text_mask, self.config.text_dim, self.config.text_len)

    def _prefix(self, dot, text_emb, text_states, text_mask, drop_text: torch.Tensor | None = None):
        """Prefix inputs [B, 2 + text_len, width] (z_t, caption states, dot token; no positions
        yet) and which of them are padding keys [B, 2 + text_len]; drop_text rows get the null condition."""
        b, c = dot.shape[0], self.config
        if text_emb.shape != (b, c.embed_dim):
            raise ValueError(f"text_emb must be [{b}, {c.embed_dim}], got {tuple(text_emb.shape)}")
        text_states, text_mask = self.prepare_text(text_states, text_mask)
        dot_h = self.dot_embed(dot)
        if drop_text is not None:
            d = drop_text.view(-1, 1)
            text_emb = torch.where(d, self.null_text_emb, text_emb)
            text_states = torch.where(d[..., None], self.null_text_states, text_states)
            text_mask = text_mask | d
            dot_h = torch.where(d, self.null_dot, dot_h)
        h = torch.cat([self.text_emb_in(text_emb)[:, None], self.text_states_in(text_states), dot_h[:, None]], dim=1)
        return h, F.pad(~text_mask, (1, 1), value=False)

    def forward(self, tokens, dot, text_emb, text_states, text_mask=None, drop_text: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, n+1, num_buckets] for tokens 1..n+1 given the first n tokens [B, n] (n < k),
        the dot bucket [B] and the text condition; rows with drop_text=True use the null condition."""
        c = self.config
        n = tokens.shape[1]
        if n >= c.kept_dims:
            raise ValueError(f"tokens must have fewer than kept_dims={c.kept_dims} columns, got {n}")
        prefix, pad = self._prefix(dot, text_emb, text_states, text_mask, drop_text)
        h = torch.cat([prefix, self.token_embed(tokens)], dim=1)
        L = h.shape[1]
        h = h + self.pos_embed[:L]
        pad = F.pad(pad, (0, n), value=False)  # keys that are padding
        # is_causal=True: left to detect it, nn.TransformerEncoder compares the mask on the host (a device sync)
        h = self.blocks(h, mask=self.causal_mask[:L, :L], src_key_padding_mask=pad, is_causal=True)
        return self.head(self.norm_out(h[:, 1 + c.text_len :]))

    def extend(self, h: torch.Tensor, key_pad: torch.Tensor, cache: "KVCache") -> torch.Tensor:
        """Run the next positions [cache.length, cache.length + n) (inputs h [B, n, width] without
        positions; key_pad [B, n] marks padding) through the blocks against the cached keys and
        values; returns their outputs [B, n, width] and appends their keys and values to the cache.
        The same arithmetic as `self.blocks` (pre-norm layers), one layer at a time."""
        b, n, width = h.shape
        start, end = cache.length, cache.length + h.shape[1]
        heads = self.config.num_heads
        h = h + self.pos_embed[start:end]
        cache.keep[:, start:end] = ~key_pad
        allowed = (~self.causal_mask[start:end, :end] & cache.keep[:, None, :end])[:, None]  # [B, 1, n, end]
        for i, layer in enumerate(self.blocks.layers):
            attn = layer.self_attn
            qkv = F.linear(layer.norm1(h), attn.in_proj_weight, attn.in_proj_bias)
            q, k, v = qkv.view(b, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # each [B, heads, n, head_dim]
            cache.keys[i][:, :, start:end] = k
            cache.values[i][:, :, start:end] = v
            a = F.scaled_dot_product_attention(q, cache.keys[i][:, :, :end], cache.values[i][:, :, :end], attn_mask=allowed,
                                               dropout_p=attn.dropout if self.training else 0.0)
            h = h + layer.dropout1(attn.out_proj(a.transpose(1, 2).reshape(b, n, width)))
            h = h + layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm2(h))))))
        cache.length = end
        return h

    # ----- sampling -----
    def guided_logits(self, tokens, dot, text_emb, text_states, text_mask, guidance_scale: float) -> torch.Tensor:
        """Next-token logits [B, num_buckets] with classifier-free guidance: uncond + s (cond - uncond)."""
        cond = self(tokens, dot, text_emb, text_states, text_mask)[:, -1]
        if guidance_scale == 1.0:
            return cond
        drop = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        uncond = self(tokens, dot, text_emb, text_states, text_mask, drop)[:, -1]
        return uncond + guidance_scale * (cond - uncond)

    def default_dot_buckets(self, batch: int, generator=None, device=None) -> torch.Tensor:
        """Uniform over the top half of the dot buckets: with quantile edges, the top half of the
        z_i.z_t distribution (the paper's best setting)."""
        self._require_basis(dot_edges=True)
        n = self.config.similarity_buckets
        gen_device = generator.device if generator is not None else "cpu"
        return torch.randint(n // 2, n, (batch,), generator=generator, device=gen_device).to(device or gen_device)

    @torch.no_grad()
    def sample(
        self,
        text_emb: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        dot_bucket: int | torch.Tensor | None = None,
        temperature: float = 1.0,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        normalize: bool = True,
        return_tokens: bool = False,
        use_cache: bool = True,
    ):
        """Draw z_i [B, D] token by token. dot_bucket: int or [B] tensor in [0, similarity_buckets);
        None draws it from the top half. temperature 0 is greedy. Needs the fitted dot edges: a
        bucket means a range of z_i.z_t only through them. use_cache=False reruns the whole
        sequence for every token (slow; the reference the cached path is tested against)."""
        self._require_basis(dot_edges=True)
        b, device, n_dot = text_emb.shape[0], text_emb.device, self.config.similarity_buckets
        if dot_bucket is None:
            dot = self.default_dot_buckets(b, generator, device)
        else:
            dot = torch.as_tensor(dot_bucket, device=device).long().expand(b).clone()
            if (dot < 0).any() or (dot >= n_dot).any():
                raise ValueError(f"dot_bucket must be in [0, {n_dot}), got {dot_bucket}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        gen_device = generator.device if generator is not None else "cpu"

        def pick(logits: torch.Tensor) -> torch.Tensor:
            if temperature == 0:
                return logits.argmax(-1)
            probs = torch.softmax(logits / temperature, dim=-1)
            return torch.multinomial(probs.to(gen_device), 1, generator=generator).squeeze(1).to(device)

        if use_cache:
            tokens = self._sample_tokens_cached(dot, text_emb, text_states, text_mask, guidance_scale, pick)
        else:
            tokens = torch.zeros(b, 0, dtype=torch.long, device=device)
            for _ in range(self.config.kept_dims):
                logits = self.guided_logits(tokens, dot, text_emb, text_states, text_mask, guidance_scale).float()
                tokens = torch.cat([tokens, pick(logits)[:, None]], dim=1)
        z = self.detokenize(tokens, normalize=normalize)
        return (z, tokens) if return_tokens else z

    def _sample_tokens_cached(self, dot, text_emb, text_states, text_mask, guidance_scale: float, pick) -> torch.Tensor:
        """The k tokens [B, k]: the prefix runs once, then one position per token."""
        b, k = dot.shape[0], self.config.kept_dims
        guided = guidance_scale != 1.0
        drop = None
        if guided:  # rows [0, b) conditional, [b, 2b) the null condition: one batch, one cache
            text_states, text_mask = self.prepare_text(text_states, text_mask)
            dot, text_emb, text_states, text_mask = (torch.cat([x, x]) for x in (dot, text_emb, text_states, text_mask))
            drop = torch.arange(2 * b, device=dot.device) >= b
        prefix, pad = self._prefix(dot, text_emb, text_states, text_mask, drop)
        cache = KVCache.for_model(self, prefix.shape[0], prefix.dtype, prefix.device)
        out = self.extend(prefix, pad, cache)[:, -1]
        no_pad = torch.zeros(prefix.shape[0], 1, dtype=torch.bool, device=prefix.device)
        tokens = []
        for j in range(k):
            logits = self.head(self.norm_out(out))
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + guidance_scale * (cond - uncond)
            tokens.append(pick(logits.float()))
            if j + 1 < k:  # the last token is never read
                nxt = torch.cat([tokens[-1], tokens[-1]]) if guided else tokens[-1]
                out = self.extend(self.token_embed(nxt)[:, None], no_pad, cache)[:, -1]
        return torch.stack(tokens, dim=1)


@dataclass
class KVCache:
    """Keys and values of every layer for the first `length` positions, preallocated to the whole
    sequence ([B, heads, seq_len, head_dim] per layer); keep[b, j]: position j may be attended (not padding)."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    keep: torch.Tensor
    length: int = 0

    @classmethod
    def for_model(cls, model: ARPrior, batch: int, dtype: torch.dtype, device) -> "KVCache":
        c = model.config
        shape = (batch, c.num_heads, model.seq_len, c.width // c.num_heads)
        empty = lambda: [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.num_layers)]
        return cls(empty(), empty(), torch.zeros(batch, model.seq_len, dtype=torch.bool, device=device))


# ----- training objective (models.objective) -----

BATCH: dict[str, Field] = {
    "image_emb": Field("float", ("B", "embed_dim"), doc="CLIP image embedding z_i, tokenised into the target"),
    "text_emb": Field("float", ("B", "embed_dim"), doc="CLIP text embedding z_t"),
    "text_states": Field("float", ("B", "L", "text_dim"), doc="caption token states; L <= text_len"),
    "text_mask": Field("bool", ("B", "L"), optional=True, doc="True = real token; default all True"),
    "drop_text": Field("bool", ("B",), optional=True, doc="rows trained with the null text condition"),
}


def training_loss(network: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None):
    """Cross-entropy of the k bucket tokens of z_i, the text condition dropped text_drop_prob of
    the time (unless the batch has `drop_text`). Metrics: loss, accuracy (next-token top-1)."""
    check_batch(BATCH, batch, "ar_prior")
    model = unwrap(network)
    image_emb, text_emb = batch["image_emb"], batch["text_emb"]
    b = image_emb.shape[0]
    tokens = model.tokenize(image_emb)
    dot = model.dot_tokens(image_emb, text_emb)
    drop = batch["drop_text"] if "drop_text" in batch else bernoulli(model.config.text_drop_prob, b, generator, image_emb.device)
    logits = network(tokens[:, :-1], dot, text_emb, batch["text_states"], batch.get("text_mask"), drop).float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
    accuracy = (logits.argmax(-1) == tokens).float().mean()
    return loss, detached(loss=loss, accuracy=accuracy)


@migration("prior.ARPrior", from_version=1)
def _ar_prior_v1_to_v2(config: dict) -> dict:
    """Format 1 named the sizes of the PCA tokens like no other module; format 2 uses the pca
    stage's names (kept_dims, num_buckets, similarity_buckets)."""
    config = dict(config)
    for old, new in (("pca_dims", "kept_dims"), ("n_buckets", "num_buckets"), ("n_dot_buckets", "similarity_buckets")):
        if old in config:
            config[new] = config.pop(old)
    return config
