"""Read path for training: the embedding table as a Ray Dataset, with a stable train/validation split.

    ds = embedding_dataset(embed_dir, split="train")                       # prior training
    ds = embedding_dataset(embed_dir, split="train", ingest_dir=shards)    # + images, decoder training
    for batch in ds.iter_torch_batches(batch_size=64): batch["image_emb"]  # (B, d) float32

The validation split is chosen by a hash of the key (blake2b of `salt + key`), so a row stays in the
same split across runs, shard orders and new data. Rows whose `split` column says "heldout" (pairs
kept out of training by the dataset itself) are neither train nor validation: ask for them with
split="heldout".

Columns in batches: key, caption, shard, split (strings); image_emb, text_emb ((B, d) float32 by
default); text_tokens ((B, context_length) int32); similarity (float32); with images also `image`
((B, H, W, 3) uint8, resized to `image_size` if given).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.schema import (
    IMAGE_EXTENSIONS,
    RAW_SHARD_SUFFIX,
    iter_tar_samples,
    list_embedding_files,
    to_matrix,
)

Split = Literal["train", "validation", "heldout", "all"]
HELDOUT = "heldout"
LIST_COLUMNS = ("image_emb", "text_emb", "text_tokens")


def validation_mask(keys, val_fraction: float, salt: str = "") -> np.ndarray:
    """True for keys in the validation split: a deterministic function of (salt, key) only."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = np.empty(len(keys), dtype=bool)
    for i, key in enumerate(keys):
        h = hashlib.blake2b(f"{salt}{key}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little") / 2**64 < val_fraction
    return out


def _select(keys, splits, split: Split, val_fraction: float, salt: str) -> np.ndarray:
    splits = np.asarray(splits, dtype=object)
    heldout = splits == HELDOUT
    if split == "all":
        return np.ones(len(keys), dtype=bool)
    if split == "heldout":
        return heldout
    val = validation_mask(keys, val_fraction, salt)
    return ~heldout & (val if split == "validation" else ~val)


def _to_numpy_batch(table: pa.Table, emb_dtype) -> dict[str, np.ndarray]:
    batch = {}
    for name in table.column_names:
        col = table[name]
        if name in LIST_COLUMNS:
            batch[name] = to_matrix(col, np.int32 if name == "text_tokens" else emb_dtype)
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            batch[name] = np.asarray(col.to_pylist(), dtype=object)
        else:
            batch[name] = col.to_numpy()
    return batch


def _split_and_convert(table: pa.Table, split: Split, val_fraction: float, salt: str, emb_dtype: str,
                       columns: list[str] | None) -> dict[str, np.ndarray]:
    keep = _select(table["key"].to_pylist(), table["split"].to_pylist(), split, val_fraction, salt)
    table = table.filter(pa.array(keep, type=pa.bool_()))
    if columns is not None:
        table = table.select(columns)
    return _to_numpy_batch(table, np.dtype(emb_dtype))


def _decode_image(data: bytes, image_size: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if image_size is not None and im.size != (image_size, image_size):
            # shorter side to image_size, then centre crop (what img2dataset's "center_crop" does)
            scale = image_size / min(im.size)
            w, h = max(image_size, round(im.size[0] * scale)), max(image_size, round(im.size[1] * scale))
            im = im.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - image_size) // 2, (h - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
        return np.asarray(im, dtype=np.uint8)


def _read_shard_with_images(batch: dict[str, np.ndarray], ingest_dir: str, split: Split, val_fraction: float,
                            salt: str, emb_dtype: str, image_size: int | None, chunk_rows: int):
    """Generator UDF: one embedding file in, its rows joined with their images from the tar, out."""
    for path in batch["path"]:
        table = pq.read_table(str(path))
        keep = _select(table["key"].to_pylist(), table["split"].to_pylist(), split, val_fraction, salt)
        table = table.filter(pa.array(keep, type=pa.bool_()))
        if table.num_rows == 0:
            continue
        index = {k: i for i, k in enumerate(table["key"].to_pylist())}
        tar = Path(ingest_dir) / f"{Path(str(path)).stem}{RAW_SHARD_SUFFIX}"
        rows, images = [], []
        for item in iter_tar_samples(str(tar)):
            if isinstance(item, Exception):
                break  # a truncated shard: the embedded rows were read before the damage
            key, fields = item
            if key not in index:
                continue
            data = next((fields[e] for e in IMAGE_EXTENSIONS if e in fields), None)
            try:
                image = _decode_image(data, image_size)
            except Exception:
                continue  # embedded once, unreadable now: skip rather than fail training
            rows.append(index[key])
            images.append(image)
            if len(rows) >= chunk_rows:
                out = _to_numpy_batch(table.take(pa.array(rows)), np.dtype(emb_dtype))
                out["image"] = np.stack(images)
                yield out
                rows, images = [], []
        if rows:
            out = _to_numpy_batch(table.take(pa.array(rows)), np.dtype(emb_dtype))
            out["image"] = np.stack(images)
            yield out


def embedding_dataset(embed_dir: str | os.PathLike, split: Split = "train", *, val_fraction: float = 0.05,
                      salt: str = "", emb_dtype: Literal["float32", "float16"] = "float32",
                      columns: list[str] | None = None, ingest_dir: str | os.PathLike | None = None,
                      image_size: int | None = None, chunk_rows: int = 256, read_cpus: float = 0.5):
    """A Ray Dataset of the embedding table's rows in `split` (see the module docstring).

    With `ingest_dir` (the raw tar shards), each row also carries its `image`; the join is per
    shard (an embedding file and its tar), so it streams without a shuffle.
    """
    import ray

    if split not in ("train", "validation", "heldout", "all"):
        raise ValueError(f"split must be one of train, validation, heldout, all; got {split!r}")
    validation_mask([], val_fraction)  # validates val_fraction
    files = [str(p) for p in list_embedding_files(embed_dir)]
    if not files:
        raise FileNotFoundError(f"no embedding files in {embed_dir} (run the embed stage first)")
    if ingest_dir is None:
        needed = None if columns is None else sorted(set(columns) | {"key", "split"})
        ds = ray.data.read_parquet(files, file_extensions=["parquet"])
        if needed is not None:
            ds = ds.select_columns(needed)  # pushed down into the Parquet read
        ds = ds.map_batches(_split_and_convert, batch_format="pyarrow", batch_size=None, num_cpus=read_cpus,
                            fn_kwargs={"split": split, "val_fraction": val_fraction, "salt": salt,
                                       "emb_dtype": emb_dtype, "columns": columns})
    else:
        ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
        ds = ds.map_batches(_read_shard_with_images, batch_size=1, num_cpus=read_cpus,
                            fn_kwargs={"ingest_dir": str(ingest_dir), "split": split, "val_fraction": val_fraction,
                                       "salt": salt, "emb_dtype": emb_dtype, "image_size": image_size,
                                       "chunk_rows": chunk_rows})
        if columns is not None:
            ds = ds.select_columns(list(columns) + (["image"] if "image" not in columns else []))
    return ds


def rows_without_image(embed_dir: str | os.PathLike, ingest_dir: str | os.PathLike) -> int:
    """Embedding rows whose image is missing from their tar shard (or whose shard is gone or cut
    short): the image join skips them, and a training stage reports how many. Reads tar headers
    only, not the images."""
    import tarfile

    missing = 0
    for path in list_embedding_files(embed_dir):
        keys = set(pq.read_table(str(path), columns=["key"])["key"].to_pylist())
        tar = Path(ingest_dir) / f"{path.stem}{RAW_SHARD_SUFFIX}"
        present = set()
        try:
            with tarfile.open(tar, mode="r|*") as archive:
                for member in archive:
                    stem, _, ext = member.name.rpartition("/")[2].partition(".")
                    if ext.lower() in IMAGE_EXTENSIONS:
                        present.add(stem)
        except (tarfile.TarError, EOFError, OSError):
            pass  # a truncated or missing shard: the images read before the damage count
        missing += len(keys - present)
    return missing


def image_task_cpus() -> float:
    """CPUs per Ray Data task that decodes images for a training stage: one where the cluster has
    two or more, half on one CPU (a whole-CPU task could never run beside the training worker).
    Each task is a process that imports torch: on 2 cores, half-CPU tasks start twice the processes
    for the same cores (the quick upsampler's data, cold: 48 s at half a CPU, 24 s at one)."""
    import ray

    return 1.0 if ray.cluster_resources().get("CPU", 1.0) >= 2 else 0.5


def decoded_pairs(batch: dict, split: str, val_fraction: float, image_size: int):
    """(row index, key, RGB uint8 image resized to image_size) of a webdataset batch's rows in
    `split` ("train" or "validation", by key hash); pairs the dataset marks "heldout" and
    undecodable images are skipped (the embed stage counts the latter)."""
    import json

    from PIL import Image

    keys = [str(k) for k in batch["__key__"]]
    in_split = validation_mask(keys, val_fraction)
    if split == "train":
        in_split = ~in_split
    meta = batch.get("json")
    for i, key in enumerate(keys):
        try:
            if not in_split[i] or (meta is not None and json.loads(meta[i]).get("split") == HELDOUT):
                continue
            with Image.open(io.BytesIO(batch["jpg"][i])) as im:
                image = np.asarray(im.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC), np.uint8)
        except Exception:
            continue
        yield i, key, image
