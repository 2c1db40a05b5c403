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
    `pca.safetensors` (mean, components, explained_variance, bucket_edges [kept_dims,
    num_buckets + 1], dot_edges) + `pca.json` (format version, total variance, dims, counts,
    quality numbers). `load_pca` returns a `models.pca.PcaBasis`, which quantises embeddings into
    AR-prior tokens and back; this module only saves and loads it.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # torch and models load only when a PCA artifact is read or written
    import torch

    from models.pca import PcaBasis

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
    clip_dir = Path(embed_dir) / CLIP_DIR
    if not (clip_dir / CLIP_SPEC_NAME).is_file():
        raise FileNotFoundError(f"{clip_dir / CLIP_SPEC_NAME} is missing: {embed_dir} is not an embed stage output")
    return load_clip_dir(clip_dir, device)


def load_clip_dir(clip_dir: str | os.PathLike, device: str = "cpu"):
    """The frozen CLIP of a CLIP directory (`<embed dir>/clip`, or one made by `export_clip_dir`)."""
    from models.clip import load_clip

    clip_dir = Path(clip_dir)
    spec_path = clip_dir / CLIP_SPEC_NAME
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path} is missing: {clip_dir} is not a CLIP directory (an embed stage's `clip/`)")
    spec = json.loads(spec_path.read_text())
    weights = _weights_file(clip_dir, spec)
    pretrained = str(weights) if weights else spec.get("pretrained")  # a named tag, or a missing file load_clip names
    return load_clip(spec.get("model"), pretrained, arch=spec.get("arch"), device=device,
                     precision=spec.get("precision", "fp32"), context_length=spec.get("context_length"))


def _weights_file(clip_dir: Path, spec: dict) -> Path | None:
    """The weights file of a CLIP directory, wherever the directory (or the run's storage) moved:
    its own (random-init weights the embed stage created, or bundled by export_clip_dir), one
    elsewhere in the run's storage (train_clip's), or the recorded path; None for a named tag."""
    own = clip_dir / CLIP_WEIGHTS_NAME
    if own.is_file() and (spec.get("random_init_seed") is not None or spec.get("bundled")):
        return own
    relative = spec.get("pretrained_relative")
    if relative and (clip_dir / relative).is_file():
        return (clip_dir / relative).resolve()
    pretrained = spec.get("pretrained")
    return Path(pretrained) if pretrained and Path(pretrained).is_file() else None


def export_clip_dir(clip_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """A self-contained copy of a CLIP directory: the spec plus the weights in `dest/clip.safetensors`,
    whether they were a random init, a local file or a named open_clip tag (loaded from the local
    cache, so nothing downloads). What a registered model carries, so it loads on any machine."""
    clip_dir, dest = Path(clip_dir), Path(dest)
    spec = json.loads((clip_dir / CLIP_SPEC_NAME).read_text())
    dest.mkdir(parents=True, exist_ok=True)
    weights = dest / CLIP_WEIGHTS_NAME
    source = _weights_file(clip_dir, spec)
    if source:
        link_or_copy(source, weights)
    elif str(spec.get("model") or "").startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"{clip_dir}: CLIP {spec['model']!r} cannot be bundled into a model (its config lives "
                         "outside open_clip); embed with a built-in open_clip name or a custom arch")
    else:  # a named tag: the weights open_clip loads from its cache
        from models.clip import save_clip_weights

        save_clip_weights(load_clip_dir(clip_dir), weights)
    spec = {**spec, "bundled": True, "pretrained_source": spec.get("pretrained"), "pretrained": None}
    spec.pop("pretrained_relative", None)
    atomic_write(dest / CLIP_SPEC_NAME, lambda tmp: Path(tmp).write_text(json.dumps(spec, indent=2, sort_keys=True)))
    return dest


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


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """A hard link where the file system allows it (large weights are not copied twice), else a copy."""
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


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
# 2: bucket_edges [kept_dims, num_buckets + 1] (one row per kept dim, models.pca's layout), dot_edges.
# 1 (no `pca_format` key): bucket_edges [num_buckets + 1, kept_dims], similarity_edges,
#   explained_variance_ratio; converted on load.
PCA_FORMAT = 2


def save_pca(basis: PcaBasis, directory: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Path:
    """Write `basis` (a models.pca.PcaBasis) as pca.safetensors + pca.json (`meta`: the pca
    stage's counts and quality numbers, kept beside the format fields)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = ["mean", "components", "explained_variance", "bucket_edges", "dot_edges"]
    tensors = {n: getattr(basis, n).detach().float().contiguous().cpu() for n in names if getattr(basis, n) is not None}
    atomic_write(directory / PCA_WEIGHTS, lambda tmp: save_file(tensors, tmp))
    meta = {**(meta or {}), "schema_version": SCHEMA_VERSION, "pca_format": PCA_FORMAT,
            "total_variance": basis.total_variance}
    atomic_write(directory / PCA_META, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, sort_keys=True)))
    return directory


def read_pca_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """pca.json of a PCA artifact: the format fields and the pca stage's counts and quality numbers."""
    path = Path(directory) / PCA_META
    if not path.is_file():
        raise FileNotFoundError(f"no PCA artifact in {directory} ({PCA_META} is missing; run the pca stage first)")
    return json.loads(path.read_text())


def load_pca(directory: str | os.PathLike, device: str | torch.device = "cpu") -> PcaBasis:
    """The models.pca.PcaBasis saved in `directory`, from this format or the first one."""
    from safetensors.torch import load_file

    from models.pca import PcaBasis

    directory = Path(directory)
    weights = directory / PCA_WEIGHTS
    if not weights.is_file() or not (directory / PCA_META).is_file():
        raise FileNotFoundError(f"no PCA artifact in {directory} (expected {PCA_WEIGHTS} and {PCA_META}; "
                                "run the pca stage first)")
    meta = read_pca_meta(directory)
    version = meta.get("pca_format", 1)
    t = load_file(str(weights), device=str(device))
    needed = {1: ("mean", "components", "explained_variance", "explained_variance_ratio", "bucket_edges",
                  "similarity_edges"),
              2: ("mean", "components", "explained_variance", "bucket_edges")}.get(version)
    if needed is None:
        raise ValueError(f"{directory / PCA_META}: pca_format {version} is newer than this code reads "
                         f"(up to {PCA_FORMAT}); update unclip-pipeline or re-run the pca stage")
    missing = [name for name in needed if name not in t]
    if missing:
        raise ValueError(f"{weights} lacks {missing} (pca_format {version}); re-run the pca stage")
    if version == 1:  # edges were [num_buckets + 1, kept_dims]; the ratio gives the total variance
        ratio = float(t["explained_variance_ratio"].double().sum())
        total = float(t["explained_variance"].double().sum()) / ratio if ratio > 0 else None
        dot_edges = t["similarity_edges"] if t["similarity_edges"].any() else None  # zeros: fitted without z_i.z_t
        basis = PcaBasis(t["mean"], t["components"], t["explained_variance"], t["bucket_edges"].T.contiguous(),
                         dot_edges, total)
    else:
        basis = PcaBasis(t["mean"], t["components"], t["explained_variance"], t["bucket_edges"], t.get("dot_edges"),
                         meta.get("total_variance"))
    try:
        return basis.validate()
    except ValueError as e:
        raise ValueError(f"{weights}: {e}; re-run the pca stage") from None
