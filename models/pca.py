"""The one PCA basis of CLIP image embeddings, and the AR prior's bucket tokens (paper section 2.2).

The paper's AR prior reduces z_i to its first k PCA coordinates (319 of 1024) and quantises each
into 1024 buckets; its conditioning token is z_i.z_t quantised too. `fit_pca` fits all of it on
an in-memory [N, D] matrix: the PCA by eigendecomposition of the covariance (accumulated in
float64 a chunk at a time), per-dimension quantile bucket edges of the kept coordinates (so every
bucket holds about the same number of training embeddings) and quantile edges of z_i.z_t.

Used by the pca stage (tasks/pca.py fits it; tasks/schema.py saves and loads it), the AR prior
(models/ar_prior.py keeps the kept part in its buffers) and the section-4 PCA probe
(models/unclip.py). Edge layout, one for all: `bucket_edges` [kept_dims, num_buckets + 1], one
row per kept dimension.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.nn import functional as F

NO_DOT_EDGES = (
    "this PCA basis has no dot-product bucket edges (dot_edges: quantiles of z_i.z_t over the training "
    "pairs), which the AR prior needs to turn z_i.z_t into its conditioning token and to sample from the "
    "top half of that distribution. Fit them with the basis, models.pca.fit_pca(image_emb, ..., "
    "similarity=(image_emb * text_emb).sum(-1)), or run the pca stage, which fits them from the embedding "
    "table's `similarity` column"
)
NO_BUCKET_EDGES = (
    "this PCA basis has no bucket edges (bucket_edges: quantiles of each kept PCA coordinate), so it "
    "cannot make AR-prior tokens: fit it with models.pca.fit_pca(..., num_buckets=...) or run the pca stage"
)


@dataclass
class PcaBasis:
    """PCA of image embeddings plus the AR prior's quantisation.

    mean [D]; components [M, D] (orthonormal rows by decreasing eigenvalue; M >= kept_dims: the
    pca stage keeps all of them for the variance curve); explained_variance [M] (eigenvalues of the
    covariance, ddof 1); bucket_edges [kept_dims, num_buckets + 1] (non-decreasing rows, outer edges
    the range seen) or None for a plain PCA; dot_edges [similarity_buckets + 1] quantile edges of
    z_i.z_t, or None; total_variance: trace of the covariance (for explained-variance ratios).

    The constructor checks shapes only (no device sync); `validate()` checks values.
    """

    mean: torch.Tensor
    components: torch.Tensor
    explained_variance: torch.Tensor
    bucket_edges: torch.Tensor | None = None
    dot_edges: torch.Tensor | None = None
    total_variance: float | None = None

    def __post_init__(self):
        if self.components.ndim != 2:
            raise ValueError(f"PcaBasis.components must be [components, dim], got {tuple(self.components.shape)}")
        m, d = self.components.shape
        if self.mean.shape != (d,):
            raise ValueError(f"PcaBasis.mean must be [{d}] like components' width, got {tuple(self.mean.shape)}")
        if self.explained_variance.shape != (m,):
            raise ValueError(f"PcaBasis.explained_variance must be [{m}] like components, got {tuple(self.explained_variance.shape)}")
        if self.bucket_edges is not None and (
            self.bucket_edges.ndim != 2 or not 1 <= self.bucket_edges.shape[0] <= m or self.bucket_edges.shape[1] < 3
        ):
            raise ValueError(
                f"PcaBasis.bucket_edges must be [kept_dims <= {m}, num_buckets + 1 >= 3], got {tuple(self.bucket_edges.shape)}"
            )
        if self.dot_edges is not None and (self.dot_edges.ndim != 1 or self.dot_edges.shape[0] < 3):
            raise ValueError(f"PcaBasis.dot_edges must be [similarity_buckets + 1 >= 3], got {tuple(self.dot_edges.shape)}")

    def validate(self) -> "PcaBasis":
        """Values a quantiser relies on: finite, edges non-decreasing. Returns self."""
        for name in ("mean", "components", "explained_variance", "bucket_edges", "dot_edges"):
            value = getattr(self, name)
            if value is not None and not torch.isfinite(value).all():
                raise ValueError(f"PcaBasis.{name} has non-finite values")
        if self.bucket_edges is not None and (self.bucket_edges.diff(dim=1) < 0).any():
            raise ValueError("PcaBasis.bucket_edges must be non-decreasing along each row (one row per kept dimension)")
        if self.dot_edges is not None and (self.dot_edges.diff() < 0).any():
            raise ValueError("PcaBasis.dot_edges must be non-decreasing")
        return self

    # ----- sizes -----
    @property
    def dim(self) -> int:
        return self.components.shape[1]

    @property
    def kept_dims(self) -> int:
        """Dimensions that are quantised (all components for a plain PCA)."""
        return self.components.shape[0] if self.bucket_edges is None else self.bucket_edges.shape[0]

    @property
    def num_buckets(self) -> int:
        return self._edges.shape[1] - 1

    @property
    def similarity_buckets(self) -> int | None:
        return None if self.dot_edges is None else self.dot_edges.shape[0] - 1

    @property
    def explained_variance_ratio(self) -> torch.Tensor:
        if self.total_variance is None:
            raise ValueError("this PcaBasis does not record total_variance (fit_pca and the pca stage do)")
        return self.explained_variance / self.total_variance

    def kept(self) -> "PcaBasis":
        """The same basis with only the kept components (what the AR prior stores)."""
        k = self.kept_dims
        return replace(self, components=self.components[:k], explained_variance=self.explained_variance[:k])

    # ----- PCA -----
    def project(self, z: torch.Tensor, dims: int | None = None) -> torch.Tensor:
        """[N, D] embeddings -> [N, dims] PCA coordinates (dims: kept_dims by default)."""
        dims = self.kept_dims if dims is None else dims
        if not 0 <= dims <= self.components.shape[0]:
            raise ValueError(f"dims={dims} must be in [0, {self.components.shape[0]}] (number of PCA components)")
        z = torch.as_tensor(z, dtype=self.mean.dtype, device=self.mean.device)
        if z.shape[-1] != self.dim:
            raise ValueError(f"embeddings of dim {z.shape[-1]} do not match this PCA basis (dim {self.dim})")
        return (z - self.mean) @ self.components[:dims].T

    def reconstruct(self, coords: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """[N, k] leading PCA coordinates -> [N, D] embeddings; normalize: back to the unit sphere."""
        coords = torch.as_tensor(coords, dtype=self.mean.dtype, device=self.mean.device)
        z = coords @ self.components[: coords.shape[-1]] + self.mean
        return F.normalize(z, dim=-1) if normalize else z

    # ----- bucket tokens -----
    @property
    def _edges(self) -> torch.Tensor:
        if self.bucket_edges is None:
            raise RuntimeError(NO_BUCKET_EDGES)
        return self.bucket_edges

    @property
    def bucket_centres(self) -> torch.Tensor:
        """[kept_dims, num_buckets]: the value a token dequantises to."""
        return (self._edges[:, 1:] + self._edges[:, :-1]) / 2

    @property
    def bucket_widths(self) -> torch.Tensor:
        return self._edges[:, 1:] - self._edges[:, :-1]

    def quantize_coords(self, coords: torch.Tensor) -> torch.Tensor:
        """[N, kept_dims] coordinates -> [N, kept_dims] int64 tokens in [0, num_buckets); values
        outside the fitted range go to the end buckets."""
        inner = self._edges[:, 1:-1].contiguous()
        return torch.searchsorted(inner, coords.T.contiguous(), right=True).T

    def dequantize_coords(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, kept_dims] tokens -> [N, kept_dims] bucket centres."""
        return self.bucket_centres.gather(1, tokens.T).T

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """[N, D] image embeddings -> [N, kept_dims] AR-prior tokens."""
        return self.quantize_coords(self.project(z))

    def dequantize(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[N, kept_dims] tokens -> [N, D] embeddings (unit norm by default, like CLIP's)."""
        return self.reconstruct(self.dequantize_coords(tokens), normalize=normalize)

    def quantize_dot(self, dot: torch.Tensor) -> torch.Tensor:
        """z_i.z_t [N] -> conditioning token [N] in [0, similarity_buckets)."""
        if self.dot_edges is None:
            raise RuntimeError(NO_DOT_EDGES)
        return torch.bucketize(dot.to(self.dot_edges.dtype), self.dot_edges[1:-1].contiguous(), right=True)


def quantile_edges(x: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """[N, ...] -> [num_buckets + 1, ...]: quantiles 0, 1/B, ..., 1 along dim 0 (linear
    interpolation, numpy's default), made non-decreasing against round-off. torch.quantile
    refuses inputs over 2**24 elements, which a paper-size fit exceeds."""
    n = x.shape[0]
    ordered = x.double().sort(dim=0).values
    position = torch.linspace(0, n - 1, num_buckets + 1, dtype=torch.float64)
    lo = position.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = (position - lo).view(-1, *[1] * (x.ndim - 1))
    edges = ordered[lo] + frac * (ordered[hi] - ordered[lo])
    return edges.cummax(dim=0).values


@torch.no_grad()
def fit_pca(
    image_emb: torch.Tensor,
    kept_dims: int,
    num_buckets: int,
    similarity: torch.Tensor | None = None,
    similarity_buckets: int = 64,
    chunk_size: int = 65536,
) -> PcaBasis:
    """Fit the basis on [N, D] image embeddings (float32 results).

    Components: all min(N, D) eigenvectors of the covariance, by decreasing eigenvalue, each signed
    so its largest entry is positive (a reproducible sign). Bucket edges: quantiles of the first
    `kept_dims` coordinates, computed in float32 exactly as `quantize` computes them, so each
    bucket holds ~N / num_buckets of the fitting rows. similarity: z_i.z_t per row [N] (the
    embedding table's column); without it the basis has no dot_edges and the AR prior cannot use it.
    """
    x = torch.as_tensor(image_emb)
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"image_emb must be a float [N, D] matrix, got {x.dtype} {tuple(x.shape)}")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"PCA needs at least 2 embeddings, got {n}")
    n_components = min(n, d)
    if not 1 <= kept_dims <= n_components:
        raise ValueError(f"kept_dims={kept_dims} must be in [1, min(rows={n}, dim={d}) = {n_components}]")
    if num_buckets < 2 or (similarity is not None and similarity_buckets < 2):
        raise ValueError(f"num_buckets and similarity_buckets must be >= 2, got {num_buckets}, {similarity_buckets}")
    if similarity is not None:
        similarity = torch.as_tensor(similarity)
        if similarity.shape != (n,):
            raise ValueError(f"similarity must be [{n}] (z_i.z_t per row), got {tuple(similarity.shape)}")

    mean = x.sum(0, dtype=torch.float64) / n
    cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for chunk in x.split(chunk_size):
        centred = chunk.double() - mean
        cov += centred.T @ centred
    cov /= n - 1
    eigval, eigvec = torch.linalg.eigh(cov)  # ascending
    eigval, eigvec = eigval.flip(0)[:n_components].clamp(min=0), eigvec.flip(1)[:, :n_components].T
    sign = eigvec.gather(1, eigvec.abs().argmax(1, keepdim=True)).sign()
    components = eigvec * torch.where(sign == 0, 1.0, sign)

    basis = PcaBasis(mean.float(), components.float(), eigval.float(), total_variance=float(cov.diagonal().sum()))
    coords = torch.cat([basis.project(chunk, kept_dims) for chunk in x.split(chunk_size)])
    bucket_edges = quantile_edges(coords, num_buckets).T.float().contiguous()
    dot_edges = None if similarity is None else quantile_edges(similarity.float(), similarity_buckets).float()
    return replace(basis, bucket_edges=bucket_edges, dot_edges=dot_edges).validate()
