"""Data contracts: the one module that writers and readers of the pipeline's tables share.

Raw shards (ingest output, img2dataset's webdataset format)
    `{shard:05d}.tar` with `{key}.jpg` (image), `{key}.txt` (caption, UTF-8), `{key}.json`
    (img2dataset metadata plus any extra input columns, e.g. `split`), beside `{shard:05d}.parquet`
    and `{shard:05d}_stats.json`.

Embedding table (embed output)
    One Parquet file per raw shard, `<embed dir>/{shard}.parquet` (shard = the tar's stem), so a new
    shard means a new file. Plain Arrow types (no Ray tensor extension type), readable by any
    Parquet reader:

        key          string                                  sample key from the shard
        caption      string
        shard        string                                  tar stem, e.g. "00003"
        split        string                                  "train" / "heldout" / "" if unknown
        image_emb    fixed_size_list<float16>[embed_dim]     L2-normalised CLIP image embedding z_i
        text_emb     fixed_size_list<float16>[embed_dim]     L2-normalised CLIP text embedding z_t
        text_tokens  fixed_size_list<int32>[context_length]  CLIP BPE tokens of the caption
        similarity   float32                                 z_i · z_t (computed in float32)

    The file's schema metadata (`unclip.embed`) records the schema version, dims and the CLIP
    model fingerprint that produced it.

PCA artifact (pca output)
    `pca.safetensors` (mean, components, explained_variance, explained_variance_ratio,
    bucket_edges, similarity_edges) + `pca.json` (dims, counts, quality numbers). `PcaBasis` loads
    it and quantises embeddings into AR-prior tokens and back.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1

# --- raw shards -----------------------------------------------------------------------------
RAW_SHARD_SUFFIX = ".tar"
RAW_SHARD_RE = re.compile(r"^(\d{5,})\.tar$")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
METADATA_EXTENSION = "json"


def raw_shard_name(index: int) -> str:
    return f"{index:05d}{RAW_SHARD_SUFFIX}"


def list_raw_shards(directory: str | os.PathLike) -> list[Path]:
    """The tar shards of an ingest output directory, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"raw shard directory {directory} does not exist (run the ingest stage first)")
    return sorted(p for p in directory.iterdir() if RAW_SHARD_RE.match(p.name) and p.is_file())


def shard_id(path: str | os.PathLike) -> str:
    """"00003" for ".../00003.tar" (the name embedding files and the `shard` column use)."""
    return Path(path).name.removesuffix(RAW_SHARD_SUFFIX)


class TruncatedShard(tarfile.ReadError):
    """A tar shard ends before its end-of-archive marker (or is not a tar at all)."""


def _has_end_marker(path: str) -> bool:
    """An uncompressed tar ends with two zero 512-byte blocks; Python's tarfile does not check this
    and stops quietly at a missing header, so a shard cut at a member boundary would pass unnoticed."""
    with open(path, "rb") as f:
        head = f.read(2)
        if head == b"\x1f\x8b" or head == b"BZ" or head == b"\xfd7":  # compressed: tarfile checks the stream
            return True
        size = f.seek(0, os.SEEK_END)
        if size < 1024 or size % 512:
            return False
        f.seek(size - 1024)
        return not any(f.read(1024))


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]] | Exception]:
    """(key, {extension: bytes}) per sample of a webdataset tar, in order (key = member name up to the
    first dot of its base name). If the tar is damaged, yields the exception as the last item, after
    the samples that were read completely before the damage (the sample at the damage point is
    dropped: some of its files may be missing)."""
    current_key, fields = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = f"{directory}/{stem}" if directory else stem
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise TruncatedShard(f"{path}: {member.name} is cut short")
                if key != current_key and current_key is not None:
                    yield current_key, fields
                    fields = {}
                current_key = key
                fields[ext.lower()] = data
        if not _has_end_marker(path):
            raise TruncatedShard(f"{path}: no end-of-archive marker (truncated)")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:  # truncated or not a tar
        yield e
        return
    if current_key is not None:
        yield current_key, fields


# --- embedding table --------------------------------------------------------------------------
EMBED_METADATA_KEY = b"unclip.embed"
EMBEDDING_FILE_SUFFIX = ".parquet"
EMB_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def embedding_schema(embed_dim: int, context_length: int, emb_dtype: str = "float16",
                     metadata: Mapping[str, Any] | None = None) -> pa.Schema:
    if emb_dtype not in EMB_DTYPES:
        raise ValueError(f"emb_dtype must be one of {sorted(EMB_DTYPES)}, got {emb_dtype!r}")
    value = EMB_DTYPES[emb_dtype]
    meta = {"schema_version": SCHEMA_VERSION, "embed_dim": embed_dim, "context_length": context_length,
            "emb_dtype": emb_dtype, **(metadata or {})}
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("caption", pa.string(), nullable=False),
            pa.field("shard", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("image_emb", pa.list_(value, embed_dim), nullable=False),
            pa.field("text_emb", pa.list_(value, embed_dim), nullable=False),
            pa.field("text_tokens", pa.list_(pa.int32(), context_length), nullable=False),
            pa.field("similarity", pa.float32(), nullable=False),
        ],
        metadata={EMBED_METADATA_KEY: json.dumps(meta, sort_keys=True).encode()},
    )


EMBEDDING_COLUMNS = tuple(embedding_schema(1, 1).names)


# The CLIP encoder that produced a table: `<embed dir>/clip/clip_spec.json` (+ clip.safetensors when the
# weights are not a named open_clip tag, e.g. a random-init tiny architecture).
CLIP_DIR = "clip"
CLIP_SPEC_NAME = "clip_spec.json"
CLIP_WEIGHTS_NAME = "clip.safetensors"


def load_embedding_clip(embed_dir: str | os.PathLike, device: str = "cpu"):
    """The frozen `models.clip.ClipEncoder` that embedded the table in `embed_dir` (for encoding
    prompts at sampling time with exactly the same CLIP)."""
    from models.clip import load_clip

    clip_dir = Path(embed_dir) / CLIP_DIR
    spec_path = clip_dir / CLIP_SPEC_NAME
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path} is missing: {embed_dir} is not an embed stage output")
    spec = json.loads(spec_path.read_text())
    pretrained = spec.get("pretrained")
    if (clip_dir / CLIP_WEIGHTS_NAME).is_file() and spec.get("random_init_seed") is not None:
        pretrained = str(clip_dir / CLIP_WEIGHTS_NAME)  # the table's own copy, wherever storage moved
    return load_clip(spec.get("model"), pretrained, arch=spec.get("arch"), device=device,
                     precision=spec.get("precision", "fp32"), context_length=spec.get("context_length"))


def embedding_file(directory: str | os.PathLike, shard: str) -> Path:
    return Path(directory) / f"{shard}{EMBEDDING_FILE_SUFFIX}"


def list_embedding_files(directory: str | os.PathLike) -> list[Path]:
    """Complete embedding files (temp files and `_manifest.json`-style names are skipped)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"embedding table directory {directory} does not exist (run the embed stage first)")
    return sorted(p for p in directory.iterdir()
                  if p.suffix == EMBEDDING_FILE_SUFFIX and not p.name.startswith((".", "_")) and p.is_file())


def fixed_list(matrix: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    """(n, d) numpy → fixed_size_list<value_type>[d]."""
    matrix = np.ascontiguousarray(matrix)
    n, d = matrix.shape
    flat = pa.array(matrix.reshape(-1).astype(value_type.to_pandas_dtype(), copy=False), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, d)


def to_matrix(column: pa.Array | pa.ChunkedArray, dtype=np.float32) -> np.ndarray:
    """fixed_size_list column → (n, d) numpy array (a copy in `dtype`)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if not pa.types.is_fixed_size_list(column.type):
        raise TypeError(f"expected a fixed_size_list column, got {column.type}")
    d = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), d).astype(dtype, copy=False)


def embedding_table(columns: Mapping[str, Any], schema: pa.Schema) -> pa.Table:
    """Build a table in the embedding schema from numpy/list columns (matrices for the list columns)."""
    arrays = []
    for field in schema:
        value = columns[field.name]
        if pa.types.is_fixed_size_list(field.type):
            arrays.append(fixed_list(np.asarray(value).reshape(-1, field.type.list_size), field.type.value_type))
        else:
            arrays.append(pa.array(value, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def embed_metadata(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(EMBED_METADATA_KEY)
    return json.loads(raw) if raw else {}


def read_embedding_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `unclip.embed` metadata of one embedding file (empty if it has none or is unreadable)."""
    try:
        return embed_metadata(pq.read_schema(path))
    except (OSError, pa.ArrowException):
        return {}


def read_embeddings(source: str | os.PathLike | Iterable[str | os.PathLike],
                    columns: list[str] | None = None) -> pa.Table:
    """Read embedding files (a directory or a list of files) into one pyarrow Table."""
    files = list_embedding_files(source) if isinstance(source, (str, os.PathLike)) and Path(source).is_dir() \
        else [Path(p) for p in ([source] if isinstance(source, (str, os.PathLike)) else source)]
    if not files:
        raise FileNotFoundError(f"no embedding files in {source}")
    tables = [pq.read_table(f, columns=columns) for f in files]
    return pa.concat_tables(tables, promote_options="none")


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call write(temp_path) then rename onto `path`: readers see the whole file or none."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_embeddings(table: pa.Table, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def remove_stale_temp_files(directory: str | os.PathLike) -> int:
    """Delete temp files a killed writer left behind (`.<name>.<id>.tmp`); returns how many."""
    n = 0
    for p in Path(directory).glob(".*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n


# --- PCA artifact ----------------------------------------------------------------------------
PCA_WEIGHTS = "pca.safetensors"
PCA_META = "pca.json"


@dataclass
class PcaBasis:
    """PCA of CLIP image embeddings, components by decreasing eigenvalue, plus AR-prior buckets.

    mean (d,), components (m, d) orthonormal rows, explained_variance (m,), bucket_edges
    (num_buckets + 1, kept_dims): per kept dim the quantile edges (outer edges = min and max seen).
    """

    mean: torch.Tensor
    components: torch.Tensor
    explained_variance: torch.Tensor
    explained_variance_ratio: torch.Tensor
    bucket_edges: torch.Tensor
    similarity_edges: torch.Tensor
    meta: dict[str, Any]

    @property
    def kept_dims(self) -> int:
        return int(self.bucket_edges.shape[1])

    @property
    def num_buckets(self) -> int:
        return int(self.bucket_edges.shape[0] - 1)

    @property
    def bucket_centers(self) -> torch.Tensor:
        """(num_buckets, kept_dims): the value `dequantize` maps a token to."""
        return 0.5 * (self.bucket_edges[1:] + self.bucket_edges[:-1])

    @property
    def bucket_widths(self) -> torch.Tensor:
        return self.bucket_edges[1:] - self.bucket_edges[:-1]

    def project(self, z: torch.Tensor, dims: int | None = None) -> torch.Tensor:
        """(n, d) embeddings → (n, dims) PCA coordinates (dims defaults to kept_dims)."""
        import torch

        dims = self.kept_dims if dims is None else dims
        z = torch.as_tensor(z, dtype=torch.float32)
        return (z - self.mean) @ self.components[:dims].T

    def reconstruct(self, coords: torch.Tensor) -> torch.Tensor:
        """(n, k) PCA coordinates → (n, d) embeddings (not re-normalised)."""
        import torch

        coords = torch.as_tensor(coords, dtype=torch.float32)
        return coords @ self.components[: coords.shape[-1]] + self.mean

    def quantize_coords(self, coords: torch.Tensor) -> torch.Tensor:
        """(n, kept_dims) coordinates → (n, kept_dims) int64 bucket tokens in [0, num_buckets)."""
        import torch

        coords = torch.as_tensor(coords, dtype=torch.float32)
        inner = self.bucket_edges[1:-1].T.contiguous()  # (kept, num_buckets - 1)
        tokens = torch.searchsorted(inner, coords.T.contiguous(), right=True).T
        return tokens.clamp_(0, self.num_buckets - 1)

    def dequantize_coords(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, kept_dims) tokens → (n, kept_dims) bucket centres."""
        import torch

        tokens = torch.as_tensor(tokens, dtype=torch.long)
        return torch.gather(self.bucket_centers, 0, tokens.clamp(0, self.num_buckets - 1))

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """(n, d) image embeddings → (n, kept_dims) AR-prior tokens."""
        return self.quantize_coords(self.project(z))

    def dequantize(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(n, kept_dims) tokens → (n, d) embeddings (unit norm by default, like CLIP's)."""
        import torch

        z = self.reconstruct(self.dequantize_coords(tokens))
        return torch.nn.functional.normalize(z, dim=-1) if normalize else z

    def quantize_similarity(self, similarity: torch.Tensor) -> torch.Tensor:
        """z_i·z_t → token in [0, len(similarity_edges) - 1) (quantiles of the training pairs)."""
        import torch

        s = torch.as_tensor(similarity, dtype=torch.float32)
        n = self.similarity_edges.numel() - 1
        return torch.searchsorted(self.similarity_edges[1:-1].contiguous(), s.contiguous(), right=True).clamp_(0, n - 1)


def save_pca(basis: PcaBasis, directory: str | os.PathLike) -> Path:
    import torch

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: getattr(basis, name).detach().float().contiguous().cpu() for name in
               ("mean", "components", "explained_variance", "explained_variance_ratio", "bucket_edges",
                "similarity_edges")}
    atomic_write(directory / PCA_WEIGHTS, lambda tmp: save_file(tensors, tmp))
    meta = {"schema_version": SCHEMA_VERSION, **basis.meta}
    atomic_write(directory / PCA_META, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, sort_keys=True)))
    return directory


def load_pca(directory: str | os.PathLike, device: str | torch.device = "cpu") -> PcaBasis:
    import torch

    from safetensors.torch import load_file

    directory = Path(directory)
    weights, meta_path = directory / PCA_WEIGHTS, directory / PCA_META
    if not weights.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"no PCA artifact in {directory} (expected {PCA_WEIGHTS} and {PCA_META}; "
                                "run the pca stage first)")
    t = load_file(str(weights), device=str(device))
    meta = json.loads(meta_path.read_text())
    return PcaBasis(t["mean"], t["components"], t["explained_variance"], t["explained_variance_ratio"],
                    t["bucket_edges"], t["similarity_edges"], meta)
