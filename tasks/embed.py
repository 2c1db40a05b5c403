"""Embed stage: CLIP image/text embeddings of the ingested shards, one Parquet file per tar shard.

Ray Data streaming pipeline:

    shard paths ──► read + decode + preprocess (tasks, `decode_cpus` each; a generator that streams
                    chunks of a shard)
                ──► CLIP encode (actor pool, `batch_size` rows per call, `num_gpus_per_actor`)
                ──► part writers (actor pool): each batch's kept rows, grouped by shard, written as a
                    part file under `.parts/<shard>/`; out comes one small row per shard (counts and
                    the part's path)
                ──► driver: adds up counts only; once all of a shard's rows are in parts, a merger
                    actor concatenates them into the shard's one Parquet file (written atomically)
                    and deletes the parts.

The driver never holds an embedding, so its memory does not grow with the data. Each reader ends a
shard with a marker row carrying the number of rows it emitted, so the driver knows when a shard is
complete whatever order the blocks arrive in. Parts live in a hidden folder that no reader lists and
every run starts by clearing, so a killed run never leaves anything that looks like a finished
shard. Writers and mergers write under the stage's output: on a cluster, storage every node sees,
or, where other nodes keep their own copy of it (pipelines.nodes), they run on the driver's node.
Damaged input is counted and skipped, never fatal: an undecodable image or a non-UTF-8 caption
drops that sample; a truncated tar keeps the samples before the damage; an unreadable tar yields
an empty file.

Incremental: a shard whose output file exists with the same fingerprint (CLIP spec, dtype,
filter) is not embedded again, so a re-run after a crash, or after new shards arrived, embeds only
the shards without output and never duplicates a row. Random-init CLIP weights (tiny demo/test
architectures) are created once, saved under `clip/`, and reused by every actor and every re-run;
`tasks.schema.load_embedding_clip` rebuilds the encoder that produced the table.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import shutil
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.context import EXECUTION_ONLY, StageContext
from tasks.progress import progress
from tasks.schema import (
    CAPTION_EXTENSION,
    CLIP_DIR,
    CLIP_SPEC_NAME,
    CLIP_WEIGHTS_NAME,
    EMBED_METADATA_KEY,
    IMAGE_EXTENSIONS,
    METADATA_EXTENSION,
    atomic_write,
    embedding_file,
    embedding_schema,
    embed_metadata,
    embedding_table,
    iter_tar_samples,
    list_embedding_files,
    list_raw_shards,
    read_embedding_metadata,
    remove_stale_temp_files,
    shard_id,
    write_embeddings,
)

STATUS_OK = "ok"
STATUS_CORRUPT_IMAGE = "corrupt_image"
STATUS_CORRUPT_CAPTION = "corrupt_caption"
STATUS_INCOMPLETE = "incomplete_sample"  # an image without a caption or the other way round
STATUS_FILTERED = "filtered_similarity"
MARKER = "__end__"
PARTS_DIR = ".parts"  # under the stage's output; hidden, so list_embedding_files never sees a part
WRITER_CPUS = 0.25  # reserved per part-writer actor (writing Parquet is light next to encoding)


class EmbedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clip_from: Literal["config", "train_clip"] = Field(
        "config", description="config: the CLIP named below; train_clip: the one the train_clip stage trained")
    clip_model: str | None = Field("ViT-L-14", description="open_clip model name (ignored when clip_arch is set)")
    clip_pretrained: str | None = Field(
        "openai", description="open_clip pretrained tag, or a local .safetensors path (relative: to storage); "
        "None: random init (only sensible with clip_arch, for tests and the demo)")
    clip_arch: dict[str, Any] | str | None = Field(
        None, description="custom open_clip architecture: a model cfg dict, a JSON file, or 'tiny'")
    context_length: int | None = Field(None, ge=8, le=512, description="override the text context length")
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    emb_dtype: Literal["float16", "float32"] = Field("float16", description="on-disk dtype of the embeddings")
    batch_size: int = Field(64, ge=1, le=65536, description="rows per encoder call")
    num_gpus_per_actor: float = Field(0.0, ge=0.0, le=8.0, description="GPUs per encoder actor (0: CPU)")
    actor_pool_size: int | None = Field(None, ge=1, le=4096, description="encoder actors (default: from cluster)", json_schema_extra=EXECUTION_ONLY)
    cpus_per_actor: float | None = Field(None, gt=0.0, le=256.0, description="CPUs reserved per encoder actor", json_schema_extra=EXECUTION_ONLY)
    torch_threads: int | None = Field(None, ge=1, le=256, description="intra-op threads per encoder actor", json_schema_extra=EXECUTION_ONLY)
    decode_cpus: float = Field(0.5, gt=0.0, le=16.0, description="CPUs reserved per decode task", json_schema_extra=EXECUTION_ONLY)
    min_similarity: float | None = Field(
        None, ge=-1.0, le=1.0, description="drop pairs with z_i·z_t below this (LAION: 0.28 with ViT-B/32)")

    @model_validator(mode="after")
    def _needs_a_model(self):
        if self.clip_arch is None and not self.clip_model:
            raise ValueError("embed: set clip_model (e.g. 'ViT-L-14') or clip_arch (e.g. 'tiny')")
        return self


def _source_identity(path: Path) -> dict[str, int]:
    """What ties an embedding file to the exact tar it came from (size and modification time)."""
    st = Path(path).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


# --- CLIP spec: what builds the encoder, identical on every actor and every re-run ---------------------
def _arch_dict(arch: dict | str | None, storage: Path) -> dict | None:
    if arch is None:
        return None
    if isinstance(arch, dict):
        return arch
    if arch == "tiny":
        from models.clip import TINY_CLIP_ARCH

        return TINY_CLIP_ARCH
    path = Path(arch) if Path(arch).is_absolute() else storage / arch
    if not path.is_file():
        raise FileNotFoundError(f"embed.clip_arch: {arch!r} is neither 'tiny', a dict, nor an existing JSON file")
    return json.loads(path.read_text())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_clip_spec(cfg: EmbedConfig, out_dir: Path, storage: Path, seed: int) -> dict[str, Any]:
    """A JSON-able spec that `build_clip` turns into the same encoder anywhere.

    Random-init architectures get their weights created once (seeded) and saved as
    `<out_dir>/clip/clip.safetensors`; a later run reuses that file if the architecture is unchanged.
    """
    arch = _arch_dict(cfg.clip_arch, storage)
    pretrained = cfg.clip_pretrained
    if arch is not None and pretrained is not None and not Path(pretrained).is_absolute() and not pretrained.startswith(("hf-hub:",)):
        pretrained = str(storage / pretrained)
    if arch is None and pretrained is not None and not Path(pretrained).is_absolute() and (storage / pretrained).is_file():
        pretrained = str(storage / pretrained)
    spec: dict[str, Any] = {"model": None if arch is not None else cfg.clip_model, "pretrained": pretrained,
                            "arch": arch, "context_length": cfg.context_length, "precision": cfg.precision}
    clip_dir = out_dir / CLIP_DIR
    if pretrained is None:  # random init (tiny test/demo architectures): create once, share the file
        weights = clip_dir / CLIP_WEIGHTS_NAME
        saved = clip_dir / CLIP_SPEC_NAME
        previous = json.loads(saved.read_text()) if saved.is_file() else {}
        same = weights.is_file() and all(previous.get(k) == spec[k] for k in ("model", "arch", "context_length")) \
            and previous.get("random_init_seed") == seed
        if not same:
            import torch

            from models.clip import load_clip, save_clip_weights

            torch.manual_seed(seed)
            encoder = load_clip(spec["model"], None, arch=arch, context_length=cfg.context_length)
            clip_dir.mkdir(parents=True, exist_ok=True)
            save_clip_weights(encoder, weights)
            del encoder
        spec["pretrained"] = str(weights)
        spec["random_init_seed"] = seed
    if spec["pretrained"] is not None and Path(spec["pretrained"]).is_file():
        weights = Path(spec["pretrained"]).resolve()
        spec["weights_sha256"] = _sha256(weights)
        if weights.is_relative_to(storage.resolve()):
            # weights of this run's (train_clip's): found from here too after the storage moves
            spec["pretrained_relative"] = os.path.relpath(weights, clip_dir.resolve())
    return spec


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")  # models.clip refuses these


def check_inputs(cfg: EmbedConfig, storage: Path) -> list[str]:
    """Problems with the local files the config names, found before any stage runs; paths are
    resolved as `resolve_clip_spec` resolves them."""
    problems = []
    arch = cfg.clip_arch
    if isinstance(arch, str) and arch != "tiny":
        path = Path(arch) if Path(arch).is_absolute() else storage / arch
        if not path.is_file():
            problems.append(f"embed.clip_arch {arch!r}: {path} does not exist; set it to 'tiny', a mapping, or a JSON file (a relative path is under storage)")
    weights = cfg.clip_pretrained
    if weights is not None and not weights.startswith("hf-hub:"):
        if arch is not None:  # a custom architecture takes a weights file only
            path, is_path = (Path(weights) if Path(weights).is_absolute() else storage / weights), True
        else:  # an open_clip tag, or a file under storage, or a file
            path = storage / weights if not Path(weights).is_absolute() and (storage / weights).is_file() else Path(weights)
            is_path = "/" in weights or weights.endswith((".safetensors", *PICKLE_SUFFIXES))
        if is_path and not path.is_file():
            problems.append(f"embed.clip_pretrained {weights!r}: {path} does not exist; set an open_clip tag (e.g. openai) or a .safetensors file (a relative path is tried under storage)")
        elif is_path and path.suffix in PICKLE_SUFFIXES:
            problems.append(f"embed.clip_pretrained {weights!r}: a pickled checkpoint, which is never loaded; convert it once to .safetensors "
                            "(safetensors.torch.save_file(state_dict, 'clip.safetensors')) and set that path")
    return problems


def clip_fingerprint(spec: dict[str, Any], cfg: EmbedConfig) -> str:
    keyed = {k: v for k, v in spec.items() if k not in ("pretrained", "pretrained_relative", "random_init_seed")}
    keyed["pretrained"] = spec["pretrained"] if "weights_sha256" not in spec else None  # content, not path
    keyed.update(emb_dtype=cfg.emb_dtype, min_similarity=cfg.min_similarity)
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def build_clip(spec: dict[str, Any], device: str = "cpu"):
    from models.clip import load_clip

    return load_clip(spec["model"], spec["pretrained"], arch=spec["arch"], device=device,
                     precision=spec.get("precision", "fp32"), context_length=spec.get("context_length"))


def describe_clip(spec: dict[str, Any]) -> tuple[int, int, dict]:
    """(embed_dim, context_length, preprocess cfg) of the encoder a spec builds, by building it."""
    encoder = build_clip(spec)
    return encoder.embed_dim, encoder.context_length, encoder.preprocess_cfg


def _describe(spec: dict[str, Any], cpus: float) -> tuple[int, int, dict]:
    """Dims and preprocessing without weights (meta device) where open_clip allows; otherwise by
    building the model in a Ray worker, so the driver never holds the weights."""
    import ray

    from models.clip import ClipError
    from models.clip import describe_clip as describe_without_weights

    try:
        info = describe_without_weights(spec["model"], spec["pretrained"], arch=spec["arch"],
                                        context_length=spec.get("context_length"))
        return info["embed_dim"], info["context_length"], info["preprocess_cfg"]
    except (ClipError, NotImplementedError, RuntimeError):
        return ray.get(ray.remote(describe_clip).options(num_cpus=cpus).remote(spec))


# --- read + decode (Ray tasks) ------------------------------------------------------------------------
def _decode_sample(fields: dict[str, bytes], preprocessor) -> tuple[str, np.ndarray | None, str, str]:
    """(status, image uint8 HWC or None, caption, split)."""
    from PIL import Image

    image_bytes = next((fields[e] for e in IMAGE_EXTENSIONS if e in fields), None)
    split = ""
    if METADATA_EXTENSION in fields:
        try:
            split = str(json.loads(fields[METADATA_EXTENSION]).get("split") or "")
        except (ValueError, AttributeError):
            split = ""
    if image_bytes is None or CAPTION_EXTENSION not in fields:
        return STATUS_INCOMPLETE, None, "", split
    try:
        caption = fields[CAPTION_EXTENSION].decode("utf-8").strip()
    except UnicodeDecodeError:
        return STATUS_CORRUPT_CAPTION, None, "", split
    try:
        with Image.open(io.BytesIO(image_bytes)) as im:
            im.load()
            array = preprocessor(im)
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return STATUS_CORRUPT_IMAGE, None, caption, split
    return STATUS_OK, array, caption, split


def read_shard(batch: dict[str, np.ndarray], preprocess_cfg: dict, chunk_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data generator UDF: one shard path in, chunks of decoded rows out, then a marker row.
    Needs only PIL and numpy (no torch import in decode workers); the encoder tokenizes."""
    from models.clip_preprocess import ImagePreprocessor

    preprocessor = ImagePreprocessor(preprocess_cfg)
    size = preprocessor.image_size
    blank = np.zeros((size, size, 3), np.uint8)
    for path in batch["path"]:
        shard = shard_id(str(path))
        rows: list[tuple] = []
        emitted = 0
        truncated = 0

        def flush():
            keys, captions, splits, images, statuses = zip(*rows) if rows else ((),) * 5
            return {
                "key": np.array(keys, dtype=object), "caption": np.array(captions, dtype=object),
                "shard": np.array([shard] * len(rows), dtype=object), "split": np.array(splits, dtype=object),
                "status": np.array(statuses, dtype=object), "count": np.zeros(len(rows), np.int64),
                "image": np.stack(images) if rows else np.zeros((0, size, size, 3), np.uint8),
            }

        for item in iter_tar_samples(str(path)):
            if isinstance(item, Exception):
                truncated = 1
                break
            key, fields = item
            status, image, caption, split = _decode_sample(fields, preprocessor)
            rows.append((key, caption, split, image if image is not None else blank, status))
            if len(rows) >= chunk_rows:
                emitted += len(rows)
                yield flush()
                rows = []
        if rows:
            emitted += len(rows)
            yield flush()
        rows = []
        marker = flush()
        for name, value in (("key", ""), ("caption", ""), ("shard", shard), ("split", ""),
                            ("status", MARKER if not truncated else MARKER + "truncated")):
            marker[name] = np.array([value], dtype=object)
        marker["count"] = np.array([emitted], np.int64)
        marker["image"] = blank[None]
        yield marker


# --- encode (actor pool) --------------------------------------------------------------------------------
class ClipEncodeActor:
    """Holds one CLIP encoder; embeds the `ok` rows of a batch, passes the other rows through."""

    def __init__(self, spec: dict[str, Any], device: str, threads: int | None, emb_dtype: str,
                 min_similarity: float | None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.clip = build_clip(spec, device=device)
        self.dtype = np.float16 if emb_dtype == "float16" else np.float32
        self.min_similarity = min_similarity

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        status = np.asarray(batch["status"], dtype=object)
        ok = np.flatnonzero(status == STATUS_OK)
        n, d = len(status), self.clip.embed_dim
        tokens = np.zeros((n, self.clip.context_length), np.int32)
        image_emb = np.zeros((n, d), self.dtype)
        text_emb = np.zeros((n, d), self.dtype)
        similarity = np.zeros(n, np.float32)
        if len(ok):
            with torch.inference_mode():
                z_i = self.clip.encode_image(self.clip.normalize(batch["image"][ok]))
                ok_tokens = self.clip.tokenize([str(c) for c in batch["caption"][ok]])
                tokens[ok] = ok_tokens.numpy().astype(np.int32)
                z_t = self.clip.encode_text(ok_tokens)
            sim = (z_i * z_t).sum(-1).cpu().numpy().astype(np.float32)
            image_emb[ok] = z_i.cpu().numpy().astype(self.dtype)
            text_emb[ok] = z_t.cpu().numpy().astype(self.dtype)
            similarity[ok] = sim
            if self.min_similarity is not None:
                status = status.copy()
                status[ok[sim < self.min_similarity]] = STATUS_FILTERED
        out = {k: v for k, v in batch.items() if k != "image"}
        out.update(status=status, image_emb=image_emb, text_emb=text_emb, text_tokens=tokens, similarity=similarity)
        return out


# --- resources ------------------------------------------------------------------------------------------
def plan_resources(cfg: EmbedConfig, cluster: dict[str, float], pending_shards: int) -> dict[str, Any]:
    """Actor pool size, CPUs/GPUs per actor and torch threads from the cluster's resources.

    CPU only: one actor per 8 CPUs; the actor and its part writer together reserve half the CPUs
    they stand for, leaving the rest to the decode tasks, and the actor runs that many intra-op
    threads (on a 2-CPU machine: 1 actor with 0.75 CPU and 2 threads, 1 writer with 0.25 CPU, decode
    tasks at 0.5 CPU each). GPUs: one actor per `num_gpus_per_actor`. One part writer per actor,
    `WRITER_CPUS` each.
    """
    cpus = float(cluster.get("CPU", 1.0))
    gpus = float(cluster.get("GPU", 0.0))
    if cfg.num_gpus_per_actor > 0:
        if gpus < cfg.num_gpus_per_actor:
            raise ValueError(f"embed.num_gpus_per_actor={cfg.num_gpus_per_actor} but the Ray cluster has {gpus:g} GPUs; "
                             "set embed.num_gpus_per_actor: 0 to encode on CPUs")
        size = cfg.actor_pool_size or max(1, int(gpus // cfg.num_gpus_per_actor))
        per_actor = cfg.cpus_per_actor or min(1.0, max(0.25, (cpus - cfg.decode_cpus - size * WRITER_CPUS) / (2 * size)))
        threads = cfg.torch_threads or max(1, int(per_actor))
    else:
        size = cfg.actor_pool_size or max(1, int(cpus // 8))
        per_actor = cfg.cpus_per_actor or max(0.25, min(cpus / size / 2, 8.0) - WRITER_CPUS)
        threads = cfg.torch_threads or max(1, int(cpus // size))
    if size * (per_actor + WRITER_CPUS) + cfg.decode_cpus > cpus + 1e-9:
        raise ValueError(
            f"embed: {size} encoder actors x {per_actor:g} CPUs + {size} part writers x {WRITER_CPUS:g} CPUs + a decode "
            f"task ({cfg.decode_cpus:g} CPUs) need more "
            f"than the cluster's {cpus:g} CPUs, which would stall the pipeline; lower embed.actor_pool_size or "
            "embed.cpus_per_actor (fractional values are fine)")
    return {"actor_pool_size": size, "cpus_per_actor": per_actor, "gpus_per_actor": cfg.num_gpus_per_actor,
            "torch_threads": threads, "decode_cpus": cfg.decode_cpus, "writer_pool_size": size,
            "cpus_per_writer": WRITER_CPUS}


# --- the stage ------------------------------------------------------------------------------------------
def _shard_table(rows: list[dict[str, np.ndarray]], schema) -> tuple:
    """Concatenate a shard's batches, keep `ok` rows; (table, status counts)."""
    cols = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]} if rows else {}
    status = cols.get("status", np.array([], dtype=object))
    counts = {s: int((status == s).sum()) for s in (STATUS_OK, STATUS_CORRUPT_IMAGE, STATUS_CORRUPT_CAPTION,
                                                     STATUS_INCOMPLETE, STATUS_FILTERED)}
    keep = np.flatnonzero(status == STATUS_OK)
    d = schema.field("image_emb").type.list_size
    length = schema.field("text_tokens").type.list_size
    data = {
        "key": cols["key"][keep].tolist() if rows else [],
        "caption": cols["caption"][keep].tolist() if rows else [],
        "shard": cols["shard"][keep].tolist() if rows else [],
        "split": cols["split"][keep].tolist() if rows else [],
        "image_emb": cols["image_emb"][keep] if rows else np.zeros((0, d)),
        "text_emb": cols["text_emb"][keep] if rows else np.zeros((0, d)),
        "text_tokens": cols["text_tokens"][keep] if rows else np.zeros((0, length)),
        "similarity": cols["similarity"][keep] if rows else np.zeros(0),
    }
    return embedding_table(data, schema), counts


STATUS_COLUMNS = {STATUS_OK: "ok", STATUS_CORRUPT_IMAGE: "corrupt_image", STATUS_CORRUPT_CAPTION: "corrupt_caption",
                  STATUS_INCOMPLETE: "incomplete", STATUS_FILTERED: "filtered"}


class ShardPartWriter:
    """Writes the kept rows of each encoded batch, grouped by shard, as a part file
    `<out>/.parts/<shard>/<id>.parquet`; returns one row per shard in the batch with its status
    counts and the part's path, and one row per end marker with the shard's expected row count.
    Embeddings stop here: what goes on to the driver is counts and paths."""

    def __init__(self, parts_dir: str, schema):
        self.parts_dir = Path(parts_dir)
        self.schema = schema

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import pyarrow.parquet as pq

        status = np.asarray(batch["status"], dtype=object)
        shards = np.asarray(batch["shard"], dtype=object)
        is_marker = np.array([str(s).startswith(MARKER) for s in status], bool)
        out: dict[str, list] = defaultdict(list)

        def add(shard, rows=0, expected=-1, truncated=False, part="", status_counts=None):
            out["shard"].append(str(shard))
            out["rows"].append(rows)
            out["expected"].append(expected)
            out["truncated"].append(truncated)
            out["part"].append(part)
            for s, column in STATUS_COLUMNS.items():
                out[column].append((status_counts or {}).get(s, 0))

        for shard in np.unique(shards[~is_marker]):
            sel = np.flatnonzero(~is_marker & (shards == shard))
            table, status_counts = _shard_table([{k: v[sel] for k, v in batch.items()}], self.schema)
            part = ""
            if table.num_rows:  # a part is complete once listed here: the driver only merges listed parts
                folder = self.parts_dir / str(shard)
                folder.mkdir(parents=True, exist_ok=True)
                part = str(folder / f"{uuid.uuid4().hex}.parquet")
                pq.write_table(table, part, compression="none")
            add(shard, rows=len(sel), part=part, status_counts=status_counts)
        for i in np.flatnonzero(is_marker):
            add(shards[i], expected=int(batch["count"][i]), truncated=str(status[i]) != MARKER)
        return {"shard": np.array(out["shard"], dtype=object), "part": np.array(out["part"], dtype=object),
                "truncated": np.array(out["truncated"], bool),
                **{k: np.array(out[k], np.int64) for k in ("rows", "expected", *STATUS_COLUMNS.values())}}


def merge_shard_parts(parts: list[str], schema, target: str, shard_parts_dir: str) -> int:
    """One shard's parts → its Parquet file (atomic: temp name, then rename), rows in key order;
    the parts are deleted afterwards. Runs as a Ray task; returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p).replace_schema_metadata(schema.metadata) for p in parts]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    write_embeddings(table.sort_by("key").replace_schema_metadata(schema.metadata), target)
    shutil.rmtree(shard_parts_dir, ignore_errors=True)
    return table.num_rows


class ShardMerger:
    """A long-lived process for `merge_shard_parts`: merges as one-off tasks started a new Ray worker
    process for many of them (Ray kills idle workers beyond the CPU count), which cost more CPU than
    the merges themselves."""

    def ready(self) -> bool:
        return True

    def merge(self, parts: list[str], schema, target: str, shard_parts_dir: str) -> int:
        return merge_shard_parts(parts, schema, target, shard_parts_dir)


def run(cfg: EmbedConfig, ctx: StageContext) -> dict[str, float]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    t0 = time.perf_counter()
    out_dir = Path(ctx.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out_dir)
    parts_dir = out_dir / PARTS_DIR
    shutil.rmtree(parts_dir, ignore_errors=True)  # a killed run's parts: their shards are embedded again
    shards = list_raw_shards(ctx.input("ingest"))

    if cfg.clip_from == "train_clip":  # the CLIP the train_clip stage exported (tasks.train_clip)
        trained = ctx.input("train_clip") / "clip"
        cfg = cfg.model_copy(update={"clip_model": None, "clip_arch": str(trained / "arch.json"),
                                     "clip_pretrained": str(trained / "clip.safetensors")})
    spec = resolve_clip_spec(cfg, out_dir, Path(ctx.storage), ctx.seed)
    fingerprint = clip_fingerprint(spec, cfg)
    (out_dir / CLIP_DIR).mkdir(exist_ok=True)
    atomic_write(out_dir / CLIP_DIR / CLIP_SPEC_NAME,
                 lambda tmp: Path(tmp).write_text(json.dumps(spec, indent=2, sort_keys=True)))
    ctx.share_with_workers(out_dir / CLIP_DIR)  # the encoders load it
    if spec["pretrained"] and Path(spec["pretrained"]).is_file() and not Path(spec["pretrained"]).is_relative_to(ctx.storage):
        ctx.share_with_workers(Path(spec["pretrained"]))  # a local file of the user's: every node must have it

    pending, existing, stale = [], 0, 0
    sources = {shard_id(p): _source_identity(p) for p in shards}
    for path in shards:
        target = embedding_file(out_dir, shard_id(path))
        if target.is_file():
            meta = read_embedding_metadata(target)
            if meta.get("fingerprint") == fingerprint and meta.get("source") == sources[shard_id(path)]:
                existing += 1
                continue
            stale += 1  # another CLIP/filter, or the tar was rewritten (e.g. ingest redone)
        pending.append(path)
    orphans = [f for f in list_embedding_files(out_dir) if f.stem not in sources]
    for f in orphans:  # its tar shard is gone: its rows must not stay in the table
        f.unlink()

    counts: dict[str, float] = defaultdict(float)
    counts.update(shards_total=len(shards), shards_skipped_existing=existing, shards_reembedded_stale=stale,
                  files_removed_orphan=len(orphans),
                  shards_embedded=0, shards_truncated=0, rows=0, rows_read=0, skipped_corrupt=0,
                  skipped_corrupt_image=0, skipped_corrupt_caption=0, skipped_incomplete=0, filtered_similarity=0)
    if pending:
        if not ray.is_initialized():
            ray.init()
        plan = plan_resources(cfg, ray.cluster_resources(), len(pending))
        counts.update({f"plan_{k}": float(v) for k, v in plan.items()})
        # mergers reserve no CPU: Ray Data holds the cluster's CPUs while shards stream, and a merge
        # that waited for one would finish shards only at the end (not incremental). Started first,
        # so that they are up before the first shard completes (waited for below).
        # Where other nodes keep their own copy of storage, the output is written on the driver's node
        # (the runner publishes it from there); its writers then take no CPU: that node may have none
        # for tasks (a cluster head), and they only concatenate and write what the encoders made.
        on_driver = {"scheduling_strategy": NodeAffinitySchedulingStrategy(ctx.driver_node_id, soft=False)} if ctx.driver_node_id else {}
        mergers = [ray.remote(ShardMerger).options(num_cpus=0, **on_driver).remote() for _ in range(plan["writer_pool_size"])]
        embed_dim, context_length, preprocess_cfg = _describe(spec, plan["decode_cpus"])
        schema = embedding_schema(embed_dim, context_length, cfg.emb_dtype,
                                  metadata={"fingerprint": fingerprint, "clip": spec})
        device = "cuda" if cfg.num_gpus_per_actor > 0 else "cpu"

        data_ctx = ray.data.DataContext.get_current()
        saved = (data_ctx.target_max_block_size, data_ctx.enable_progress_bars)
        # small blocks: a shard streams through in chunks instead of one big block of decoded images
        data_ctx.target_max_block_size = 16 * 2**20
        data_ctx.enable_progress_bars = ctx.show_progress
        try:
            ds = ray.data.from_items([{"path": str(p)} for p in pending], override_num_blocks=len(pending))
            ds = ds.map_batches(read_shard, batch_size=1, num_cpus=plan["decode_cpus"],
                                fn_kwargs={"preprocess_cfg": preprocess_cfg, "chunk_rows": cfg.batch_size})
            ds = ds.map_batches(
                ClipEncodeActor, batch_size=cfg.batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=plan["actor_pool_size"]),
                num_cpus=plan["cpus_per_actor"], num_gpus=plan["gpus_per_actor"] or None,
                fn_constructor_kwargs={"spec": spec, "device": device, "threads": plan["torch_threads"],
                                       "emb_dtype": cfg.emb_dtype, "min_similarity": cfg.min_similarity})
            # batch_size=None: each encoded block is written as it comes, so shards finish while others stream
            ds = ds.map_batches(
                ShardPartWriter, batch_size=None, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=plan["writer_pool_size"]),
                num_cpus=0 if on_driver else plan["cpus_per_writer"], **on_driver,
                fn_constructor_kwargs={"parts_dir": str(parts_dir), "schema": schema})
        finally:
            data_ctx.target_max_block_size, data_ctx.enable_progress_bars = saved

        next_merger = itertools.cycle(mergers)
        parts: dict[str, list[str]] = defaultdict(list)
        seen: dict[str, int] = defaultdict(int)
        expected: dict[str, int] = {}
        truncated: set[str] = set()
        merging: dict[Any, str] = {}
        try:
            ray.get([m.ready.remote() for m in mergers])
            with progress(total=len(pending), desc="embed: shards", unit="shard", enabled=ctx.show_progress) as bar:
                def collect(timeout: float | None):
                    done, _ = ray.wait(list(merging), num_returns=len(merging), timeout=timeout)
                    for ref in done:
                        merging.pop(ref)
                        counts["rows"] += ray.get(ref)
                        counts["shards_embedded"] += 1
                        bar.update(1)

                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    if "first_output_seconds" not in counts:  # start-up + the first part written
                        counts["first_output_seconds"] = time.perf_counter() - t0
                    for i, shard in enumerate(batch["shard"]):
                        if batch["expected"][i] >= 0:
                            expected[shard] = int(batch["expected"][i])
                            if batch["truncated"][i]:
                                truncated.add(shard)
                            continue
                        seen[shard] += int(batch["rows"][i])
                        if batch["part"][i]:
                            parts[shard].append(str(batch["part"][i]))
                        counts["rows_read"] += int(batch["rows"][i])
                        counts["skipped_corrupt_image"] += int(batch["corrupt_image"][i])
                        counts["skipped_corrupt_caption"] += int(batch["corrupt_caption"][i])
                        counts["skipped_incomplete"] += int(batch["incomplete"][i])
                        counts["filtered_similarity"] += int(batch["filtered"][i])
                    for shard in [s for s in expected if seen[s] == expected[s]]:
                        meta = {**embed_metadata(schema), "source": sources[shard]}
                        shard_schema = schema.with_metadata({EMBED_METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
                        ref = next(next_merger).merge.remote(parts.pop(shard, []), shard_schema,
                                                             str(embedding_file(out_dir, shard)), str(parts_dir / shard))
                        merging[ref] = shard
                        del expected[shard], seen[shard]
                    if merging:
                        collect(timeout=0)
                if merging:
                    collect(timeout=None)
        finally:
            for merger in mergers:
                ray.kill(merger)
        if expected or seen or parts:
            raise RuntimeError("embed: incomplete shards after the pipeline finished: "
                               f"{sorted(set(expected) | set(seen) | set(parts))}")
        shutil.rmtree(parts_dir, ignore_errors=True)
        counts["shards_truncated"] = len(truncated)
        if truncated:
            import logging

            logging.getLogger(__name__).warning("embed: truncated or unreadable tar shards (rows before the damage were kept): %s",
                                                sorted(truncated))
    counts["skipped_corrupt"] = (counts["skipped_corrupt_image"] + counts["skipped_corrupt_caption"]
                                 + counts["skipped_incomplete"])
    counts["seconds"] = time.perf_counter() - t0
    if counts["seconds"] > 0 and counts["rows_read"]:
        counts["samples_per_second"] = counts["rows_read"] / counts["seconds"]
    _log_mlflow(counts)
    return dict(counts)


def _log_mlflow(counts: dict[str, float]) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics({k: float(v) for k, v in counts.items() if math.isfinite(float(v))})
