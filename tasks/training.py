"""The one Ray Train loop every `train_*` stage runs; a stage brings only its `TrainSpec`.

    driver (stage's run):  fit(spec, cfg, ctx, train_ds, val_ds)
        └─ TorchTrainer(train_loop, ScalingConfig from cfg + cluster, RunConfig(storage=<out_dir> or the store's))
    each worker:  build network (models.sizes) → init_from → resume from ray.train.get_checkpoint()
        → DDP or FSDP (cfg.strategy) → steps: batches from get_dataset_shard("train"), spec.batches
        turns them into the kind's objective batch, AdamW + warm-up/cosine, clipping,
        accumulation, EMA, NaN/inf skips → every `checkpoint_every`: validation loss (EMA),
        training state reported via ray.train.report → rank 0 logs to MLflow.

After `fit`, `<out_dir>/ema` (exported weights), `<out_dir>/network` (raw) and `<out_dir>/best`
(the EMA of the kept checkpoint with the lowest validation loss) load with
`models.checkpoint.load`, without Ray; `<out_dir>/training.json` says how far they were trained
(`step`, counted from `start_step` when warm-started; tasks.register records it per part). A
re-run of the stage with the same `RunConfig` resumes from the latest persisted checkpoint and
continues the same MLflow run.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.context import EXECUTION_ONLY, StageContext
from tasks.progress import progress as progress_bar

# Worker lines go through logging: Ray Train's workers print each print() twice (stdout, and its log on stderr)
log = logging.getLogger(__name__)

RAY_RUN_NAME = "ray_train"
TRAINING_FILE = "training.json"  # {"step", "start_step", "init_from"} of the exported weights


class TrainingFailed(RuntimeError):
    """A training stage that cannot finish; the message says why and what to change."""


class TrainConfig(BaseModel):
    """Settings every training stage shares; a stage's config class adds its own."""

    model_config = ConfigDict(extra="forbid")

    size: str = Field("tiny", description="named size in models/sizes.py (tiny, small, base, paper)")
    model: dict[str, Any] = Field(default_factory=dict, description="overrides of the named size's config fields")
    init_from: str | None = Field(None, description="start from these weights: a models.checkpoint directory, "
                                  "a finished stage's output directory (its `ema/`), a run's storage directory "
                                  "(its `<stage>/ema/`), a diffusers directory, or a registry URI "
                                  "(models:/name@alias, models:/name/version) of a stack with this stage's part")
    steps: int = Field(1000, ge=1, description="optimizer steps")
    max_minutes: float | None = Field(
        None, gt=0, description="wall-time budget of the training loop (from the first read of the data to the last "
        "checkpoint; worker start-up excluded): train as many of `steps` as fit, planned from the time the steps "
        "so far took, and end the LR cosine at the planned step; None: all `steps`")
    finish_by_minute: float | None = Field(
        None, gt=0, description="end the training loop by this minute of the pipeline run (counted from the start "
        "of `unclip run`, or of the stage when it runs alone), planned as max_minutes is; with max_minutes, whichever "
        "ends first. A stage that should take what the stages before it left (the demo's decoder) sets it")
    start_step: int = Field(0, ge=0, description="the step count init_from's weights were trained to: a warm start "
                            "counts on from it, to start_step + steps (unclip retrain sets it from the champion)")
    batch_size: int = Field(64, ge=1, description="rows per worker per micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    adam_eps: float = Field(1e-8, gt=0, description="AdamW's epsilon")
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay ends at lr * min_lr_ratio")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm (None: no clipping)")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: bool = Field(True, description="EMA decay min(ema_decay, (1+t)/(10+t)) at update t")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="autocast dtype; auto: bf16 on GPU, fp32 on CPU; bf16 on a CPU without "
                        "AVX-512 or AMX trains in fp32 (emulated bf16 is many times slower)")
    workers: int = Field(1, ge=1, description="data-parallel training workers", json_schema_extra=EXECUTION_ONLY)
    # Not execution-only: an FSDP checkpoint keeps one optimizer shard per worker, a DDP one the whole state.
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="data parallelism over the workers: ddp (a full replica per worker) or fsdp (parameters, "
        "gradients and optimizer state sharded; the EMA is kept whole on the first worker)")
    use_gpu: bool = Field(False, description="one GPU per worker", json_schema_extra=EXECUTION_ONLY)
    cpus_per_worker: float | None = Field(
        None, gt=0, description="default: what the cluster can give while leaving room for Ray Data",
        json_schema_extra=EXECUTION_ONLY)
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads per worker; default: the worker's CPUs, or with cache_data the "
        "cluster's CPUs / workers. A small model's step can be faster on fewer (the tiny prior: on 1)",
        json_schema_extra=EXECUTION_ONLY)
    checkpoint_every: int = Field(200, ge=1, description="steps between checkpoints (and validation)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept besides the latest (the best by validation loss)")
    log_every: int = Field(20, ge=1, description="steps between metric logs")
    sample_every: int | None = Field(None, ge=1, description="steps between sample artifacts (default: at checkpoints)")
    val_batches: int = Field(4, ge=1, description="validation batches per evaluation")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="rows held out for validation (by key hash)")
    max_failures: int = Field(1, ge=0, description="worker failures Ray Train recovers from")
    max_bad_steps: int = Field(20, ge=1, description="consecutive NaN/inf steps before the stage stops")
    shuffle_buffer: int = Field(
        1024, ge=0, description="rows each worker shuffles before batching, with a new order every epoch (0: read "
        "order); with cache_data the whole shard is shuffled")
    cache_data: bool = Field(
        True, description="hold the training data in Ray's object store after the first read, and each worker's "
        "shard in its memory (fast epochs on small data: a whole-shard shuffle every epoch); turn off for data "
        "larger than that, which is then streamed every epoch with a shuffle_buffer shuffle",
        json_schema_extra=EXECUTION_ONLY)


@dataclass
class TrainSpec:
    """What a stage brings to the loop.

    kind: a models.sizes kind. batches: a class built once per worker as
    `batches(device, **batch_args)` and called on each Ray Data torch batch (dict of CPU tensors)
    to give the objective's batch on `device` (e.g. caption states from the frozen CLIP).
    samples: optional `samples(network, batch, step, directory) -> (paths, metrics)` drawing
    artifacts and figures from the EMA network and one validation batch (through `batches`).
    """

    kind: str
    batches: Callable[..., Any]
    batch_args: dict[str, Any] = field(default_factory=dict)
    samples: Callable[..., tuple[list[Path], dict[str, float]]] | None = None
    setup: Callable[[Any], None] | None = None  # called on each worker's new network (e.g. a PCA basis)
    columns: list[str] | None = None  # the Ray Data columns the loop needs (tensors only)


class ToDevice:
    """Batches that are already the objective's batch: each tensor moved to the device (floats
    as float32, integer randomness such as `t` as int64, flags as bool)."""

    def __init__(self, device):
        self.device = device

    def __call__(self, raw: dict) -> dict:
        import torch

        def convert(value):
            if value.dtype.is_floating_point:
                return value.float()
            return value if value.dtype == torch.bool else value.long()

        return {k: convert(v).to(self.device) for k, v in raw.items()}


# ---------------------------------------------------------------------------------------------
# Driver side


def worker_resources(cfg: TrainConfig, cluster: dict[str, float]) -> dict[str, float]:
    """CPUs (and GPU) per worker. On a small machine whole-CPU workers starve Ray Data's read
    tasks and the run deadlocks (STACK.md): leave one CPU for data, split the rest."""
    if cfg.cpus_per_worker is not None:
        cpus = cfg.cpus_per_worker
    else:
        total = float(cluster.get("CPU", 1))
        cpus = max(0.25, min(4.0, (total - 1.0) / cfg.workers)) if total > 1 else 0.5 / cfg.workers
    resources = {"CPU": cpus}
    if cfg.use_gpu:
        resources["GPU"] = 1.0
    return resources


def torch_threads(cfg: TrainConfig, resources: dict[str, float], cluster: dict[str, float]) -> int:
    """Torch threads per worker. The CPU left to Ray Data by `worker_resources` has nothing to
    read once the data is cached before the first step, so the workers share it then."""
    if cfg.torch_threads is not None:
        return cfg.torch_threads
    if borrows_idle_cpus(cfg):
        return max(1, int(float(cluster.get("CPU", 1)) // cfg.workers))
    return max(1, int(resources["CPU"]))


def borrows_idle_cpus(cfg: TrainConfig) -> bool:
    """Whether `torch_threads` counts the CPUs no worker reserved (the shared case above): those
    can be another stage's when stages run side by side (pipelines.runner), see SharedThreads."""
    return cfg.torch_threads is None and cfg.cache_data and cfg.cpus_per_worker is None and not cfg.use_gpu


def fit(spec: TrainSpec, cfg: TrainConfig, ctx: StageContext, model_config: dict[str, Any],
        train_ds, val_ds) -> dict[str, float]:
    """Train `cfg.steps` steps from `cfg.start_step` (resuming if a checkpoint of this stage exists), export,
    return counts."""
    import mlflow
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if spec.columns:
        train_ds = train_ds.select_columns(spec.columns)
        val_ds = val_ds.select_columns(spec.columns) if val_ds is not None else None
    # The loop draws its own progress; Ray Data's per-dataset bars would repeat in the log each epoch
    # and each validation. A dataset keeps the context it was made with, so it is set on each.
    for ds in (train_ds, val_ds):
        if ds is not None:
            ds.context.enable_progress_bars = False
    if cfg.cache_data:
        train_ds = train_ds.materialize()
        val_ds = val_ds.materialize() if val_ds is not None else None
    datasets = {"train": train_ds}
    if val_ds is not None:
        datasets["validation"] = val_ds
    cluster = ray.cluster_resources()
    resources = worker_resources(cfg, cluster)
    active = mlflow.active_run()
    init_from = resolve_init_from(cfg.init_from, ctx.storage, ctx.name, mlflow.get_tracking_uri(),
                                  download_to=ctx.out_dir / "init_from")
    if init_from:  # the workers load it
        ctx.share_with_workers(Path(init_from))
    loop_config = {
        "kind": spec.kind,
        "model_config": model_config,
        "init_from": init_from,
        "train": cfg.model_dump(mode="json", include=set(TrainConfig.model_fields)),
        "batches": spec.batches,
        "batch_args": spec.batch_args,
        "samples": spec.samples,
        "setup": spec.setup,
        "seed": ctx.seed,
        "threads": torch_threads(cfg, resources, cluster),
        "own_cpus": resources["CPU"] if borrows_idle_cpus(cfg) else None,
        "mlflow": {"tracking_uri": mlflow.get_tracking_uri(), "run_id": active.info.run_id if active else None},
        "has_validation": val_ds is not None,
        "show_progress": ctx.show_progress,
        "interactive": sys.stderr.isatty(),  # the driver's terminal decides: a bar, or log lines (tasks/progress.py)
        "stage": ctx.name,
        "deadline": None if cfg.finish_by_minute is None else (ctx.run_started or time.time()) + 60 * cfg.finish_by_minute,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=RAY_RUN_NAME,
            storage_path=ctx.checkpoint_path or str(ctx.out_dir),
            storage_filesystem=ctx.checkpoint_filesystem,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute="val_loss" if val_ds is not None else None,
                checkpoint_score_order="min",
            ),
        ),
        datasets=datasets,
        # every worker sees all of validation; one worker reads train whole (a split starts a
        # coordinator actor per stage: seconds of start-up for nothing to split)
        dataset_config=DataConfig(datasets_to_split=["train"] if cfg.workers > 1 else [],
                                  execution_options=ingest_options()),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps the worker's error; surface its message, not Ray's stack
        raise TrainingFailed(f"{ctx.name}: training failed: {_root_cause(e)}") from None
    if result.checkpoint is None:
        raise TrainingFailed(f"{ctx.name}: training ended without a checkpoint")
    export(result, ctx.out_dir)
    metrics = result.metrics or {}
    final_step = int(metrics.get("step", cfg.start_step + cfg.steps))
    (ctx.out_dir / TRAINING_FILE).write_text(json.dumps(
        {"step": final_step, "start_step": cfg.start_step, "init_from": loop_config["init_from"]}, indent=2))
    return {
        "steps": float(final_step),
        "loss": float(metrics.get("loss", float("nan"))),
        "val_loss": float(metrics.get("val_loss", float("nan"))),
        "skipped_steps": float(metrics.get("skipped_steps", 0)),
        "resumed_from_step": float(metrics.get("resumed_from_step", 0)),
        "train_s": time.perf_counter() - started,
    }


def ingest_options():
    """Ray Train's default ingest options (those of the driver's DataContext) without
    `exclude_resources`: Ray 2.60's default passes it (zero: the pipeline never sets it), and its deprecation
    warning would take two lines of every training stage's log."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=current.resource_limits, preserve_order=current.preserve_order,
                            verbose_progress=current.verbose_progress)


def export(result, out_dir: Path) -> None:
    """Copy the final checkpoint's EMA and raw weights, and the best (lowest validation loss)
    EMA, to `<out_dir>/{ema,network,best}` in the models' own checkpoint format."""
    best = result.checkpoint
    scored = [(m.get("val_loss"), c) for c, m in (result.best_checkpoints or []) if m.get("val_loss") is not None]
    scored = [(v, c) for v, c in scored if math.isfinite(v)]
    if scored:
        best = min(scored, key=lambda vc: vc[0])[1]
    with result.checkpoint.as_directory() as final:
        _replace_dir(Path(final) / "ema", out_dir / "ema")
        _replace_dir(Path(final) / "network", out_dir / "network")
    with best.as_directory() as chosen:
        _replace_dir(Path(chosen) / "ema", out_dir / "best")


def _replace_dir(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def resolve_init_from(source: str | None, storage: Path, stage: str = "", tracking_uri: str | None = None,
                      download_to: Path | None = None) -> str | None:
    """The directory holding the weights to start from; TrainingFailed when there is none.

    `source`: a models.checkpoint or diffusers directory; a finished stage's directory (its
    exported `ema/`); a run's storage directory (its `<stage>/ema/`); or a registry URI
    (`models:/name@alias`, `models:/name/version`) whose stack has the part this stage trains,
    downloaded into `download_to`. Without `download_to` (pipelines.checks, before the run) a
    registry URI is only resolved to a version, nothing is downloaded.
    """
    if source is None:
        return None
    if source.startswith("models:/"):
        return _registry_part(source, stage, tracking_uri, download_to)
    path = Path(source) if Path(source).is_absolute() else Path(storage) / source
    if stage and (path / stage / "ema").is_dir():
        path = path / stage / "ema"
    elif (path / "ema").is_dir():
        path = path / "ema"
    if not path.is_dir():
        raise TrainingFailed(f"init_from {source!r} does not exist (looked at {path}); give a checkpoint "
                             "directory, a finished training stage's directory, a run's storage directory, "
                             "a diffusers directory or a registry URI (models:/name@alias)")
    return str(path)


def _registry_part(source: str, stage: str, tracking_uri: str | None, download_to: Path | None) -> str | None:
    """The directory of this stage's part of the registered stack `source` (see resolve_init_from)."""
    from tasks.stack import PART_OF, StackError, registry_source, resolve_model

    part = PART_OF.get(stage)
    if part is None:
        raise TrainingFailed(f"init_from {source!r}: a registered stack has parts {sorted(PART_OF.values())}, none "
                             f"of which {stage or 'this stage'} trains; give a checkpoint directory instead")
    try:
        if download_to is None:
            registry_source(source, tracking_uri)
            return None
        shutil.rmtree(download_to, ignore_errors=True)  # a fresh copy: the alias may point elsewhere now
        parts = resolve_model(source, download_to, tracking_uri)
    except StackError as e:
        raise TrainingFailed(f"init_from {source!r}: {e}") from None
    if parts.get(part) is None:
        have = ", ".join(p for p, d in parts.items() if d is not None)
        raise TrainingFailed(f"init_from {source!r}: the registered stack has no {part} (it has {have}); register a "
                             f"stack with a {part}, or give init_from a checkpoint directory")
    return str(parts[part])


def check_inputs(stage: str, cfg: TrainConfig, storage: Path, tracking_uri: str | None = None) -> list[str]:
    """Problems found before the run starts (pipelines.checks): an init_from that is not there
    (a registry URI is looked up at `tracking_uri`)."""
    if (cfg.init_from or "").startswith("models:/") and (tracking_uri or "").startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):].split("?")[0])
        if not db.is_file():  # looking it up would create an empty store before the run starts
            return [f"{stage}.init_from {cfg.init_from!r}: there is no model registry at {tracking_uri} ({db} does "
                    "not exist); point MLFLOW_TRACKING_URI (or mlflow.tracking_uri) at the store the model was "
                    "registered in"]
    try:
        resolve_init_from(cfg.init_from, storage, stage, tracking_uri)
    except TrainingFailed as e:
        return [f"{stage}.{e}"]
    return []


def _root_cause(error: BaseException) -> str:
    """The worker's own exception line(s) out of Ray's wrapped error text."""
    while getattr(error, "__cause__", None) is not None:
        error = error.__cause__
    lines = [line.rstrip() for line in str(error).splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Failed|Diverged)\b.*:", lines[i]):
            # the loop's own TrainingFailed says what failed and the fix: its class name adds nothing
            return "\n".join(lines[i:i + 6]).removeprefix(f"{__name__}.{TrainingFailed.__name__}: ")
    return lines[-1] if lines else type(error).__name__


# ---------------------------------------------------------------------------------------------
# Worker side


class HeldShard:
    """A worker's training shard as tensors in its memory (cache_data), read once."""

    def __init__(self):
        self.columns: dict[str, Any] | None = None

    def read(self, shard, batch_size: int) -> None:
        import torch

        parts = list(shard.iter_torch_batches(batch_size=batch_size))
        self.columns = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


class ValidationBatches:
    """The first `val_batches` batches of the validation shard, read once on first use: every
    checkpoint's validation loss and sample grid then see the same rows (Ray Data need not keep
    their order between reads), and none starts a Ray Data execution (seconds each on a small host)."""

    def __init__(self, shard, cfg: TrainConfig):
        self.shard, self.batch_size, self.count = shard, cfg.batch_size, cfg.val_batches
        self.batches: list[dict[str, Any]] | None = None

    def __iter__(self):
        if self.batches is None:
            self.batches = list(itertools.islice(self.shard.iter_torch_batches(batch_size=self.batch_size), self.count))
        return iter(self.batches)


def epoch_batches(shard, cfg: TrainConfig, seed: int, held: HeldShard | None):
    """One epoch of a worker's training batches (drop_last). Streamed: Ray Data reads the shard and
    shuffles `shuffle_buffer` rows at a time. Held (cache_data): the first epoch reads the shard into
    memory, and every epoch is a seeded permutation of all of it, sliced: a better shuffle than a
    buffer's, and no trip through Ray Data per batch."""
    import torch

    if held is None:
        shuffle = dict(local_shuffle_buffer_size=cfg.shuffle_buffer, local_shuffle_seed=seed) if cfg.shuffle_buffer else {}
        yield from shard.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True, **shuffle)
        return
    if held.columns is None:
        held.read(shard, cfg.batch_size)
    n = len(held)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if cfg.shuffle_buffer else torch.arange(n)
    for start in range(0, n - cfg.batch_size + 1, cfg.batch_size):
        rows = order[start:start + cfg.batch_size]
        yield {k: v[rows] for k, v in held.columns.items()}


def train_loop(config: dict[str, Any]) -> None:
    import numpy as np
    import ray.data
    import ray.train
    import torch
    from ray.train import Checkpoint
    from ray.train.torch import get_device, prepare_model

    from models import objective as objectives
    from models import sizes
    from models.training_state import (EMA, load_state_dict, load_training_state, save_state_dict, save_training_state,
                                       warmup_cosine)

    cfg = TrainConfig.model_validate(config["train"])
    ray.data.DataContext.get_current().enable_progress_bars = False  # the loop has its own bar
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = get_device()
    torch.set_num_threads(config["threads"])
    threads = SharedThreads(config["own_cpus"], config["threads"], world) if config["own_cpus"] else None
    torch.manual_seed(config["seed"] + rank)
    np.random.seed(config["seed"] + rank)
    generator = torch.Generator(device=device).manual_seed(config["seed"] * 1000 + rank)

    network = sizes.build_from_config(config["kind"], config["model_config"])
    if config["setup"]:
        config["setup"](network)
    if config["init_from"]:
        load_init_weights(network, config["init_from"])
    network.to(device)
    ema = EMA(network, decay=cfg.ema_decay, warmup=cfg.ema_warmup)
    fsdp = cfg.strategy == "fsdp" and world > 1
    # A warm start counts on from the steps its weights were trained for (the schedule starts afresh).
    step, end = cfg.start_step, cfg.start_step + cfg.steps
    counters = {"skipped_steps": 0, "samples": 0, "resumed_from_step": 0}
    # The optimizer and its schedule are made after wrapping (FSDP's parameters are its shards), so
    # a resume reads their states first and loads them after.
    saved_optimizer, saved_schedule = _HeldState(), _HeldState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            step, extra = load_training_state(d, network=network, ema=ema, optimizer=saved_optimizer,
                                              lr_scheduler=saved_schedule)
            if extra.get("strategy", "ddp") != cfg.strategy:
                raise TrainingFailed(f"the checkpoint at step {step} was written with strategy="
                                     f"{extra.get('strategy', 'ddp')}, this run has strategy={cfg.strategy}; set it "
                                     "back, or start the stage over")
            if fsdp:  # this rank's optimizer shard: same workers, same sharding
                if extra.get("workers") != world:
                    raise TrainingFailed(f"the FSDP checkpoint at step {step} has optimizer shards of "
                                         f"{extra.get('workers')} workers, this run has {world}; set workers="
                                         f"{extra.get('workers')}, or start the stage over")
                saved_optimizer.state = load_state_dict(d, f"optimizer_rank{rank}")
        counters.update(extra.get("counters", {}))
        counters["resumed_from_step"] = step
        if rank == 0:
            log.info(f"{config['stage']}: resuming from the checkpoint at step {step}")
        torch.manual_seed(config["seed"] + rank + 7919 * step)  # fresh draws after a resume, still seeded
        generator.manual_seed(config["seed"] * 1000 + rank + 7919 * step)
    if fsdp:
        model = _fsdp(prepare_model(network, parallel_strategy=None), device)
    else:
        model = prepare_model(network)  # DDP when world > 1; the objective calls its forward
    # fused: one kernel for every parameter's update (3x faster than foreach on the demo decoder on
    # CPU, 27 -> 9 ms a step); not under FSDP, whose sharded flat parameters it was not tried with
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps,
                                  fused=not fsdp)
    schedule = warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    if checkpoint is not None:
        optimizer.load_state_dict(saved_optimizer.state)
        schedule.load_state_dict(saved_schedule.state)
    objective = sizes.objective(config["kind"])
    contract = sizes.batch_contract(config["kind"])
    make_batch = config["batches"](device, **config["batch_args"])
    autocast = _autocast(cfg.precision, device)
    logger = _Logger(config, rank) if rank == 0 else None

    train_shard = ray.train.get_dataset_shard("train")
    val_batches = ValidationBatches(ray.train.get_dataset_shard("validation"), cfg) if config["has_validation"] else None
    held = HeldShard() if cfg.cache_data else None
    checked, bad_in_a_row, last, epoch = False, 0, {}, 0
    # The logged loss is the mean over the window's good steps: a NaN batch is skipped and
    # counted, and does not become the stage's reported loss.
    window_start, window_samples, window_losses, good_metrics = time.perf_counter(), 0, [], {}
    budget = StepBudget(cfg.max_minutes, step, end, float(counters.get("train_s", 0.0)), config["deadline"])
    progress = _progress(end, step, config) if rank == 0 else None
    while step < end:
        micro = 0
        batches_this_epoch = 0
        epoch += 1
        for raw in epoch_batches(train_shard, cfg, config["seed"] * 1000 + rank + 7919 * step + epoch, held):
            batches_this_epoch += 1
            if threads is not None:
                threads.follow_idle_cpus()
            batch = make_batch(raw)
            if not checked:
                objectives.check_batch(contract, batch, config["kind"])
                checked = True
            sync = micro + 1 == cfg.grad_accum
            with (model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()):
                with autocast:
                    loss, metrics = objective(model, batch, generator)
                (loss / cfg.grad_accum).backward()
            micro += 1
            window_samples += len(next(iter(batch.values()))) * world
            if not sync:
                continue
            micro = 0
            if fsdp:  # the norm over every shard
                norm = model.clip_grad_norm_(cfg.grad_clip or float("inf"))
            else:
                norm = torch.nn.utils.clip_grad_norm_(network.parameters(), cfg.grad_clip or float("inf"))
            # The norm is taken after DDP's all-reduce, so every rank takes the same decision.
            if torch.isfinite(norm):
                optimizer.step()
                if hasattr(network, "after_optimizer_step"):  # e.g. CLIP keeps its logit scale <= 100
                    network.after_optimizer_step()
                with _full_weights(model, fsdp):  # FSDP: the whole network on rank 0 (others only take part)
                    if rank == 0 or not fsdp:
                        ema.update(network)
                bad_in_a_row = 0
                window_losses.append(loss.detach())
                good_metrics = metrics
            else:
                counters["skipped_steps"] += 1
                bad_in_a_row += 1
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise TrainingFailed(
                        f"{bad_in_a_row} consecutive steps had a NaN/inf loss or gradient (step {step}); "
                        "lower train.lr, set grad_clip, or check the data for NaNs. The last good checkpoint is kept.")
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            step += 1
            counters["samples"] += cfg.batch_size * cfg.grad_accum * world
            if progress is not None:
                progress.update(1)
            if budget.limited and step % cfg.log_every == 0:
                end = _replan(budget, step, end, schedule, cfg, rank, progress, device)
            if step % cfg.log_every == 0 or step == end:
                elapsed = time.perf_counter() - window_start
                last = {
                    "step": step,
                    "loss": float(torch.stack(window_losses).float().mean()) if window_losses else float("nan"),
                    **{k: float(v) for k, v in good_metrics.items()},
                    "lr": optimizer.param_groups[0]["lr"],  # what the next step uses
                    "grad_norm": float(norm),
                    "samples_per_s": window_samples / max(elapsed, 1e-9),
                    "skipped_steps": counters["skipped_steps"],
                }
                window_start, window_samples, window_losses = time.perf_counter(), 0, []
                if logger:
                    logger.metrics(last, step)
            if step % cfg.checkpoint_every == 0 or step == end:
                counters["train_s"] = budget.elapsed()
                report = {**last, "step": step, "skipped_steps": counters["skipped_steps"],
                          "resumed_from_step": counters["resumed_from_step"]}
                if val_batches is not None and rank == 0:  # rank 0's metrics score the checkpoint
                    report["val_loss"] = validation_loss(ema.module, objective, make_batch, val_batches, config["seed"], device, autocast)
                ckpt = None
                tmp = None
                with _full_weights(model, fsdp):  # FSDP: every rank takes part
                    if rank == 0:
                        tmp = tempfile.mkdtemp(prefix="unclip-ckpt-")
                        # FSDP: each rank's optimizer shard goes in a file of its own (below)
                        save_training_state(tmp, network=network, ema=ema,
                                            optimizer=_HeldState({}) if fsdp else optimizer, lr_scheduler=schedule,
                                            step=step, extra={"counters": counters, "strategy": cfg.strategy,
                                                              "workers": world})
                        ckpt = Checkpoint.from_directory(tmp)
                if fsdp:  # Ray Train gathers every rank's files into the one checkpoint directory
                    tmp = tmp or tempfile.mkdtemp(prefix="unclip-ckpt-")
                    save_state_dict(optimizer.state_dict(), tmp, f"optimizer_rank{rank}")
                    ckpt = Checkpoint.from_directory(tmp)
                if rank == 0:
                    if logger:
                        logger.metrics({k: report[k] for k in ("val_loss",) if k in report}, step)
                ray.train.report(report, checkpoint=ckpt)
                if tmp:
                    shutil.rmtree(tmp, ignore_errors=True)
            draw_every = cfg.sample_every or cfg.checkpoint_every
            if logger and config["samples"] and val_batches is not None and (step % draw_every == 0 or step == end):
                logger.samples(config["samples"], ema.module, make_batch, val_batches, step)
            if step >= end:
                break
        if batches_this_epoch == 0:
            raise TrainingFailed(f"the training split has fewer rows than batch_size={cfg.batch_size} per worker "
                                 f"({world} workers): lower batch_size or add data")
    if progress is not None:
        progress.close()


class SharedThreads:
    """Torch threads of a worker that borrows the CPUs no worker reserved, re-counted every few
    seconds: with stages side by side (pipelines.runner) another stage's worker may hold them now,
    and more threads than cores make OpenMP's spinning threads stall each other (the quick preset's
    train_clip and train_upsampler side by side at 2 threads each took 233 and 254 s, one after the
    other 78 and 55 s)."""

    def __init__(self, own_cpus: float, most: int, workers: int, every_s: float = 5.0):
        self.own_cpus, self.most, self.workers, self.every_s = own_cpus, most, workers, every_s
        self.checked = -math.inf

    def follow_idle_cpus(self) -> None:
        if time.monotonic() - self.checked < self.every_s:
            return
        import ray
        import torch

        self.checked = time.monotonic()
        threads = shared_thread_count(self.own_cpus, ray.available_resources().get("CPU", 0.0), self.workers, self.most)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)


def shared_thread_count(own_cpus: float, idle_cpus: float, workers: int, most: int) -> int:
    """A worker's own CPUs plus its share of the idle ones, whole, at least 1 and at most `most`."""
    return max(1, min(most, int(own_cpus + idle_cpus / workers + 1e-6)))


class StepBudget:
    """The end step that fits a wall-time budget (TrainConfig.max_minutes) and a deadline (a
    time.time(), from finish_by_minute), re-planned every time `plan` is called from the mean time of
    the steps taken so far (checkpoints included), never past `end`. Steps taken before a resume
    count against `minutes` with the seconds they took (`spent`)."""

    def __init__(self, minutes: float | None, step: int, end: int, spent: float = 0.0, deadline: float | None = None):
        self.seconds = None if minutes is None else 60.0 * minutes
        self.end, self.spent, self.deadline = end, spent, deadline
        self.first_step, self.started = step, time.perf_counter()

    @property
    def limited(self) -> bool:
        return self.seconds is not None or self.deadline is not None

    def elapsed(self) -> float:
        return self.spent + time.perf_counter() - self.started

    def seconds_left(self) -> float:
        by_minutes = self.seconds - self.elapsed() if self.seconds is not None else math.inf
        by_deadline = self.deadline - time.time() if self.deadline is not None else math.inf
        return max(0.0, min(by_minutes, by_deadline))

    def plan(self, step: int) -> int:
        if not self.limited or step <= self.first_step:
            return self.end
        per_step = (time.perf_counter() - self.started) / (step - self.first_step)
        fits = step + int(self.seconds_left() / per_step)
        return max(step, min(self.end, fits))


class _HeldState:
    """Stands for an optimizer or LR schedule in models.training_state: holds the state it is given."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def state_dict(self) -> dict | None:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def _replan(budget: StepBudget, step: int, end: int, schedule, cfg: TrainConfig, rank: int, progress, device) -> int:
    """The end step the time budget allows now (rank 0's plan on every rank), with the LR cosine
    refit to end there."""
    import torch
    import torch.distributed as dist

    from models.training_state import refit_total_steps

    planned = torch.tensor(budget.plan(step), device=device)  # on the device: NCCL broadcasts only CUDA tensors
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(planned, src=0)
    planned = int(planned)
    if planned != end:
        refit_total_steps(schedule, planned - cfg.start_step)
        if progress is not None:
            progress.total = planned
        if rank == 0 and end == budget.end:  # the first cut
            log.info(f"time budget: {planned - step} more steps fit, to step {planned} of {budget.end}")
    return planned


def _fsdp(network, device):
    """torch's FSDP around the (placed) network: Ray's prepare_model(parallel_strategy="fsdp")
    refuses without CUDA, and torch's FSDP needs `device_id` to run on CPU (gloo). Original
    parameters stay visible (use_orig_params), so the optimizer and EMA see them by name. Frozen
    parameters stay whole on every rank: nothing trains them, and models read some outside
    forward (the prior's CLIP normalisation in `to_latent`), where FSDP's would be shards."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    scalars = [name for name, p in network.named_parameters() if p.requires_grad and p.dim() == 0]
    if scalars:
        raise TrainingFailed(f"strategy=fsdp: {type(network).__name__} trains scalar parameters ({', '.join(scalars)}), "
                             "which torch's FSDP cannot shard; use strategy=ddp for this stage")
    frozen = [p for p in network.parameters() if not p.requires_grad]
    return FullyShardedDataParallel(network, device_id=device, use_orig_params=True, ignored_states=frozen or None)


def _full_weights(model, fsdp: bool):
    """FSDP: the whole parameters gathered on rank 0 for the block (a collective: every rank enters)."""
    if not fsdp:
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(model, writeback=False, rank0_only=True)


def _autocast(precision: str, device):
    import torch

    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16 and device.type == "cpu" and not cpu_has_native_bf16():
        # emulated bf16 (an AVX2-only CPU) ran the quick decoder at 14 samples/s: fp32 is many times faster there
        warnings.warn("precision bf16: this CPU has no native bf16 in oneDNN (it needs AVX-512 or AMX), "
                      "training in fp32", stacklevel=2)
        use_bf16 = False
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def cpu_has_native_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN
        return False


def validation_loss(network, objective, make_batch, val_batches: ValidationBatches, seed: int, device, autocast) -> float:
    """Mean objective of the (EMA) network over the validation batches, with fixed draws (same
    seed each time) so successive values are comparable."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed + 12345)
    total, n = 0.0, 0
    network.eval()
    with torch.no_grad():
        for raw in val_batches:
            with autocast:
                loss, _ = objective(network, make_batch(raw), generator)
            if torch.isfinite(loss):
                total, n = total + float(loss), n + 1
    network.train()
    return total / n if n else float("nan")


def load_init_weights(network, source: str) -> None:
    """Weights for `network` from a models.checkpoint directory or a diffusers directory."""
    from models import checkpoint

    path = Path(source)
    if (path / checkpoint.CONFIG_NAME).is_file() and (path / checkpoint.WEIGHTS_NAME).is_file():
        try:
            _, _ = checkpoint.read_config(path)
        except checkpoint.CheckpointError:
            pass  # a diffusers config.json: handled below
        else:
            loaded = checkpoint.load(path)
            missing, unexpected = network.load_state_dict(loaded.state_dict(), strict=False)
            if missing or unexpected:
                raise TrainingFailed(f"init_from {source}: weights do not fit this model "
                                     f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")
            return
    from_diffusers = getattr(type(network), "from_diffusers", None)
    if from_diffusers is None:
        raise TrainingFailed(f"init_from {source}: not a models.checkpoint directory, and "
                             f"{type(network).__name__} cannot load diffusers weights")
    loaded = from_diffusers(str(path))
    network.load_state_dict(loaded.state_dict())


class _Logger:
    """Rank 0's MLflow logging into the stage's run (the driver's active child run)."""

    def __init__(self, config: dict[str, Any], rank: int):
        self.run_id = config["mlflow"]["run_id"]
        self.client = None
        if self.run_id:
            from mlflow import MlflowClient

            self.client = MlflowClient(config["mlflow"]["tracking_uri"])

    def metrics(self, values: dict[str, float], step: int) -> None:
        if not self.client or not values:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        finite = [Metric(k, float(v), now, step) for k, v in values.items() if k != "step" and math.isfinite(float(v))]
        if finite:
            self.client.log_batch(self.run_id, metrics=finite)

    def samples(self, draw, network, make_batch, val_batches: ValidationBatches, step: int) -> None:
        raw = next(iter(val_batches), None)
        if raw is None or not self.client:
            return
        with tempfile.TemporaryDirectory() as d:
            network.eval()
            paths, figures = draw(network, make_batch(raw), step, Path(d))
            network.train()
            for path in paths:
                self.client.log_artifact(self.run_id, str(path), artifact_path="samples")
        self.metrics(figures, step)


def _progress(total: int, start: int, config: dict[str, Any]):
    if not config["show_progress"]:
        return None
    if not config["interactive"]:  # lines on this worker's stderr, which Ray forwards to the driver's log
        return progress_bar(total=total, initial=start, desc=config["stage"], unit="step", interactive=False)
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=total, desc=config["stage"], unit="step")
    bar.update(start)
    return bar
