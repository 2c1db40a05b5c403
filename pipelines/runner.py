"""Runs the planned stages in one Ray driver, with manifests for skip/resume and MLflow runs.

The run's data is the config's input plus the URL lists `unclip retrain` added (pipelines.retrain).
Each stage writes under `<storage>/<stage>/` and then, atomically and last, `_manifest.json`.
A stage whose manifest matches its config and its inputs' manifests is skipped. Otherwise its
manifest is removed first (so partial output never looks complete) and it is redone: from
scratch, or, for an incremental stage whose settings did not change, from where it stopped.

With storage on an object store (`s3://...`, pipelines.object_store) the stages run in a local
mirror; the store's manifests decide what is done, a stage's finished inputs are pulled before it
runs, and a finished stage is published to the store, manifest last, before its local manifest.
A training stage keeps its Ray Train checkpoints and its start marker in the store itself, so it
resumes on whichever machine runs it next. On a cluster whose other nodes do not see the mirror,
those nodes keep their own copy of it (pipelines.nodes.NodeMirrors) and pull each stage's inputs too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import signal
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from rich.console import Console
from rich.markup import escape

from pipelines.checks import check_stage_names, preflight
from pipelines.config import ConfigError, PipelineConfig
from pipelines.dag import Stage, plan
from pipelines.nodes import NodeMirrors, check_storage_on_every_node
from pipelines.object_store import ObjectStore
from tasks.context import MANIFEST, StageContext
from tasks.training import RAY_RUN_NAME

MLFLOW_RUN_ID = ".mlflow_run_id"
STARTED = ".started"  # not *.json: img2dataset treats every json in its folder as a finished shard

console = Console(stderr=True)
console.soft_wrap = not console.is_terminal  # in a log (`ray job logs`, CI) a message stays on one line


FAILURE = "failure.txt"  # a failed stage's traceback, beside its partial output and in its MLflow run
# Set when Ctrl-C ends a run with stages still in their threads: Ray's shutdown then kills their actors, which
# is not a failure of those stages to report
INTERRUPTED = threading.Event()


class StageInputMissing(RuntimeError):
    pass


class StageFailed(RuntimeError):
    """A stage raised: its error in one line; the traceback is in the stage's FAILURE file."""


def run_pipeline(cfg: PipelineConfig, only: list[str] | None = None, until: str | None = None) -> dict[str, dict[str, Any]]:
    """Run the pipeline; returns {stage: {"status": "ran"|"skipped", "counts": {...}}}."""
    from pipelines.retrain import kept_by_retrain, open_storage, with_retrain_state

    started = time.time()  # a stage's finish_by_minute counts from here

    storage, store = open_storage(cfg)  # with an object store: the local mirror the stages run in
    cfg = with_retrain_state(cfg, storage)  # the run's data and warm starts include what `unclip retrain` added
    if only is None and (kept := kept_by_retrain(cfg, storage, store)):
        console.print(f"[dim]⏭  {', '.join(kept)}: kept (this storage was retrained: new data is embedded with "
                      f"the CLIP the models learnt from; --only {kept[0]} trains it again)[/]")
        only = [s for s in cfg.stages if s not in kept]
    check_stage_names(cfg, only, until)
    stages = plan(cfg, only, until)
    planned = {s.name for s in stages}
    if not store:
        check_finished_inputs(stages, cfg, storage, planned)
    preflight(cfg, [s.name for s in stages])  # bad paths and URIs fail here, before anything is written
    if store:
        check_finished_inputs(stages, cfg, storage, planned, store)
    on_cluster = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    if on_cluster:
        ensure_ray(cfg)  # on a cluster, stages may hand work to Ray (img2dataset's ray distributor)
    storage.mkdir(parents=True, exist_ok=True)
    (storage / "_pipeline").mkdir(exist_ok=True)
    mirrors = check_storage_on_every_node(storage, store) if on_cluster else None
    if mirrors:
        check_tracking_reaches_nodes(cfg, stages, mirrors)
    config_file = storage / "_pipeline" / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    if store:
        store.write_text("_pipeline/config.yaml", config_file.read_text())

    tracking_uri = start_tracking(cfg, storage)
    where = f"{store.uri} (local mirror {storage})" if store else str(storage)
    console.print(f"[bold]unclip[/] {cfg.name}: storage {where}, MLflow {tracking_uri}")
    if mirrors:
        console.print(f"{len(mirrors.nodes)} Ray node(s) do not see {storage} ({', '.join(mirrors.nodes.values())}): "
                      "each keeps its own copy, pulled from the store before the stages whose workers read it")

    with mlflow.start_run(run_name=cfg.name) as parent:
        mlflow.set_tags({"unclip.storage": store.uri if store else str(storage), "unclip.stages": ",".join(s.name for s in stages)})
        mlflow.log_artifact(str(config_file))
        INTERRUPTED.clear()
        try:
            results = run_stages(stages, cfg, storage, store, run_started=started, parent_run_id=parent.info.run_id,
                                 mirrors=mirrors)
        except KeyboardInterrupt:
            INTERRUPTED.set()
            raise
        mlflow.set_tag("unclip.skipped", ",".join(n for n, r in results.items() if r["status"] == "skipped"))
    console.print(f"[bold green]done[/] (MLflow run {parent.info.run_id})")
    if "evaluate" in results:
        print_where_to_look(storage / "evaluate", store, tracking_uri)
    return results


def run_stages(stages: list[Stage], cfg: PipelineConfig, storage: Path, store: ObjectStore | None,
               run_started: float, parent_run_id: str, mirrors: NodeMirrors | None = None) -> dict[str, dict[str, Any]]:
    """Run each stage once its inputs in this run have finished, up to `cfg.parallel_stages` at a
    time; results in plan order. Parallel stages are threads of this driver (their work runs in
    Ray's processes), so one stage's start-up (actors, imports) overlaps another's training. After
    a failure no new stage starts; those running finish (their output is kept), then it is raised.
    One at a time too, a stage that is not `alone` runs in a thread: Ray Train's fit in the main
    thread installs its own SIGINT handler, whose abort ends the process with exit code 1 and no word."""
    planned = {stage.name for stage in stages}
    waiting = list(stages)
    finished: queue.Queue = queue.Queue()
    results: dict[str, dict[str, Any]] = {}
    running: set[str] = set()
    failure: BaseException | None = None

    def work(stage: Stage) -> None:
        try:
            finished.put((stage.name, run_stage(stage, cfg, storage, store, run_started=run_started,
                                                parent_run_id=parent_run_id, mirrors=mirrors), None))
        except BaseException as e:  # handed to the main thread, which raises it
            finished.put((stage.name, None, e))

    while waiting or running:
        for stage in [] if failure else list(waiting):
            if len(running) >= cfg.parallel_stages or not all(n in results for n in stage.inputs(cfg) if n in planned):
                continue
            if stage.alone:
                if not running:  # alone, here: then look again at what became ready
                    waiting.remove(stage)
                    results[stage.name] = run_stage(stage, cfg, storage, store, run_started=run_started, mirrors=mirrors)
                break
            waiting.remove(stage)
            running.add(stage.name)
            if stage.needs_ray:
                ensure_ray(cfg)  # here: ray.init installs signal handlers, which only the main thread may
            # daemon: Ctrl-C ends the run at once instead of waiting for the stages that run
            threading.Thread(target=work, args=(stage,), name=f"stage-{stage.name}", daemon=True).start()
        if not running:
            if waiting and not failure:
                continue
            break
        name, result, error = finished.get()
        running.discard(name)
        if error is not None:
            failure = failure or error
            if running:
                console.print(f"[red]{name} failed[/]: waiting for {', '.join(sorted(running))} to finish before stopping")
        else:
            results[name] = result
    if failure is not None:
        raise failure
    return {stage.name: results[stage.name] for stage in stages}


def print_where_to_look(evaluate_dir: Path, store: ObjectStore | None, tracking_uri: str) -> None:
    """The end of a run that evaluated: where the samples, the report and the bars are, and the
    command that opens MLflow (this venv's own mlflow, so it works without activating the venv)."""
    from tasks.evaluate import BARS_FILE

    where = f"{store.uri}/evaluate" if store else str(evaluate_dir)
    bars = json.loads((evaluate_dir / BARS_FILE).read_text()) if (evaluate_dir / BARS_FILE).exists() else []
    failed = [b["bar"] for b in bars if not b["passed"]]
    console.print(f"samples: {where}/grids/  report: {where}/report.html")
    if bars:
        verdict = "[green]all passed[/]" if not failed else f"[red]{len(failed)} not met[/]: " + "; ".join(failed)
        console.print(f"quality bars: {len(bars) - len(failed)} of {len(bars)} met ({where}/{BARS_FILE}), {verdict}")
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    if tracking_uri.startswith("sqlite:"):
        console.print(f"MLflow: {mlflow_bin} ui --backend-store-uri {tracking_uri}")
    else:
        console.print(f"MLflow: {tracking_uri}")


def check_finished_inputs(stages: list[Stage], cfg: PipelineConfig, storage: Path, planned: set[str],
                          store: ObjectStore | None = None) -> None:
    """Each stage's inputs that this run does not make must have finished (in the store, if any)."""
    for stage in stages:
        for name in stage.inputs(cfg):
            if name not in planned and finished_manifest(name, storage, store) is None:
                raise input_missing(stage.name, name, store.uri if store else storage)


def input_missing(stage: str, needed: str, where: str | Path) -> StageInputMissing:
    return StageInputMissing(f"stage {stage!r} needs {needed!r}, which has not finished in {where} (no {needed}/{MANIFEST}); run it first, e.g. without --only")


def finished_manifest(stage: str, storage: Path, store: ObjectStore | None = None) -> dict[str, Any] | None:
    """The stage's manifest where the run's truth is: the store, or the storage directory."""
    return store.read_manifest(stage) if store else read_manifest(storage / stage)


def run_stage(stage: Stage, cfg: PipelineConfig, storage: Path, store: ObjectStore | None = None,
              run_started: float | None = None, parent_run_id: str | None = None,
              mirrors: NodeMirrors | None = None) -> dict[str, Any]:
    """Run one stage, or skip it when its manifest matches. `parent_run_id`: the pipeline's MLflow
    run, for a stage run in a thread of its own (MLflow's active run is per thread). `mirrors`: the
    cluster nodes with their own copy of the store, which get the stage's inputs too."""
    out_dir = storage / stage.name
    inputs = {name: storage / name for name in stage.inputs(cfg)}
    input_manifests = {name: finished_manifest(name, storage, store) for name in inputs}
    for name, manifest in input_manifests.items():
        if manifest is None:
            raise input_missing(stage.name, name, store.uri if store else storage)
    stage_cfg = cfg.stage_config(stage.name)
    config_hash = _digest(relocatable(output_settings(stage_cfg), storage))
    input_digests = {name: _manifest_digest(m) for name, m in sorted(input_manifests.items())}
    fingerprint = _digest(
        {
            "stage": stage.name,
            "config": config_hash,
            "seed": cfg.seed,
            "inputs": input_digests,
            "external": {relocatable(uri, storage): _checksum(uri, storage) for uri in stage.external_inputs(cfg)},
        }
    )
    previous = finished_manifest(stage.name, storage, store)
    if previous and previous.get("fingerprint") == fingerprint:
        console.print(f"[dim]⏭  {stage.name}: up to date (manifest matches), skipped[/]")
        return {"status": "skipped", "counts": previous["counts"]}
    if store:
        # The stage runs here: its inputs must be in the mirror, and an incremental stage grows
        # from the store's finished output (this mirror may be empty, or hold an older one).
        for name in inputs:
            store.pull(name, storage / name)
        if mirrors and stage.needs_ray:  # its workers read them on any node
            mirrors.pull(list(inputs))
        local = read_manifest(out_dir)
        if stage.incremental and previous and previous.get("config_hash") == config_hash and local != previous:
            store.pull(stage.name, out_dir)
        elif local is not None and local != previous:  # an older output, not the store's: not ours to resume
            (out_dir / MANIFEST).unlink()

    # An incremental stage keeps what it has when its own settings are unchanged: after a crash
    # (the start marker says so) or when only its inputs grew (the old manifest says so). A resumable
    # one continues its checkpoints only for the same settings and inputs (its marker is the fingerprint).
    marker = fingerprint if stage.resumable else config_hash
    # a resumable stage on a store checkpoints there, beside the store's marker: any machine may continue it
    checkpoints_in_store = store is not None and stage.resumable
    if checkpoints_in_store:
        started_with = store.read_text(f"{stage.name}/{STARTED}")
    else:
        started_with = (out_dir / STARTED).read_text() if (out_dir / STARTED).is_file() else None
    resume = (stage.incremental and config_hash in (started_with, (previous or {}).get("config_hash"))) or (
        stage.resumable and marker == started_with)
    if out_dir.exists() and not resume:
        clear_stage_dir(out_dir, keep=stage.keep)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    (out_dir / FAILURE).unlink(missing_ok=True)  # a resumed stage's earlier failure
    (out_dir / STARTED).write_text(marker)
    if checkpoints_in_store:
        if not resume:
            store.delete(f"{stage.name}/{RAY_RUN_NAME}")  # an attempt with other settings or inputs
        store.write_text(f"{stage.name}/{STARTED}", marker)
    console.print(f"[bold cyan]▶  {stage.name}[/]" + (" (resuming: keeping finished parts)" if resume and (
        checkpoints_in_store or any(out_dir.iterdir())) else ""))

    if stage.needs_ray:
        ensure_ray(cfg)
    ctx = StageContext(name=stage.name, storage=storage, out_dir=out_dir, inputs=inputs, seed=cfg.seed,
                       show_progress=cfg.progress, run_started=run_started,
                       checkpoint_path=store.path(stage.name) if checkpoints_in_store else None,
                       checkpoint_filesystem=store.fs if checkpoints_in_store else None,
                       driver_node_id=mirrors.driver_node_id if mirrors else None,
                       copy_to_nodes=mirrors.copy if mirrors else None)
    started = datetime.now(timezone.utc)
    # A stage resumed after a crash continues its own MLflow run (its id is kept in the stage
    # directory); one that grows with its inputs is a new run (its appended inputs are new params).
    run_id_file = out_dir / MLFLOW_RUN_ID
    run_id = run_id_file.read_text().strip() if resume and started_with is not None and run_id_file.is_file() else None
    if resume and checkpoints_in_store and run_id is None:  # begun on another machine: its run, if tracked here too
        run_id = known_run(store.read_text(f"{stage.name}/{MLFLOW_RUN_ID}"), cfg.mlflow.experiment)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else stage.name, nested=True,
                          parent_run_id=parent_run_id) as child:
        run_id_file.write_text(child.info.run_id)
        if checkpoints_in_store:
            store.write_text(f"{stage.name}/{MLFLOW_RUN_ID}", child.info.run_id)
        mlflow.log_params(_flatten(stage_cfg.model_dump(mode="json")))
        mlflow.set_tag("unclip.stage", stage.name)
        t0 = time.perf_counter()
        try:
            with interrupts_stay_interrupts():
                counts = {k: float(v) for k, v in stage.run(stage_cfg, ctx).items()}
        except Exception as e:
            raise stage_failed(stage.name, e, out_dir) from e
        duration = time.perf_counter() - t0
        mlflow.log_metrics({**counts, "duration_s": duration})
    manifest = {
        "stage": stage.name,
        "fingerprint": fingerprint,
        "config_hash": config_hash,
        "inputs": input_digests,
        "counts": counts,
        "package_version": version("unclip-pipeline"),
        "started_at": started.isoformat(),
        "duration_s": duration,
    }
    if store:  # published first: until the store has the manifest, the mirror keeps its start marker
        store.publish(stage.name, out_dir, _manifest_text(manifest), local_only=(STARTED,),
                      keep=(RAY_RUN_NAME, STARTED) if checkpoints_in_store else ())
    write_manifest(out_dir, manifest)
    summary = ", ".join(f"{k}={v:g}" for k, v in counts.items())
    console.print(f"[green]✓  {stage.name}[/] in {duration:.1f} s: {summary}")
    return {"status": "ran", "counts": counts}


@contextlib.contextmanager
def interrupts_stay_interrupts():
    """img2dataset (ingest) and Ray Train (a fit in the main thread) install SIGINT handlers that end
    the process with `sys.exit(0)` and leave them installed, so a Ctrl-C during or after such a stage
    ended the run with exit code 0, as if it had succeeded. A stage's handler is undone when the
    stage ends, and an exit 0 from within it is an interrupt (the CLI then exits 130)."""
    main = threading.current_thread() is threading.main_thread()  # only it has signal handlers
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    except SystemExit as e:
        if e.code not in (0, None):
            raise
        raise KeyboardInterrupt from None
    finally:
        if main:
            signal.signal(signal.SIGINT, before)


def known_run(run_id: str | None, experiment: str) -> str | None:
    """The run id if the tracking store has that run, live and in this experiment (a shared server), else None."""
    try:
        run = mlflow.MlflowClient().get_run(run_id.strip()) if run_id else None
    except MlflowException:
        return None
    ours = mlflow.get_experiment_by_name(experiment)
    if run is None or ours is None or run.info.experiment_id != ours.experiment_id or run.info.lifecycle_stage != "active":
        return None
    return run.info.run_id


def stage_failed(name: str, error: Exception, out_dir: Path) -> StageFailed:
    """The console gets the error in one line, as the stages word theirs (what failed and the fix);
    the whole traceback goes beside the partial output and into the stage's MLflow run."""
    trace = "".join(traceback.format_exception(error))
    (out_dir / FAILURE).write_text(trace)
    try:
        mlflow.log_text(trace, FAILURE)
    except Exception:  # the tracking store failing too must not hide the stage's error
        pass
    lines = str(error).strip().splitlines()
    message = lines[0].removeprefix(f"{name}: ") if lines else ""
    if type(error).__module__ == "builtins" or not message:  # ours name the problem; a KeyError needs its type
        message = f"{type(error).__name__}: {message}" if message else type(error).__name__
    if not INTERRUPTED.is_set():
        console.print(f"[red]✗  {name} failed[/]: {escape(message)}")
    return StageFailed(f"{name} failed: {message} (traceback: {out_dir / FAILURE})")


def clear_stage_dir(out_dir: Path, keep: tuple[str, ...] = ()) -> None:
    """Remove a stage's output before it is redone, except the `keep` paths (Stage.keep)."""
    if not keep:
        shutil.rmtree(out_dir)
        return
    for path in out_dir.iterdir():
        if path.name not in keep:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def check_tracking_reaches_nodes(cfg: PipelineConfig, stages: list[Stage], mirrors: NodeMirrors) -> None:
    """Training workers log to MLflow from any node: a tracking store that is a file on this node
    (the default sqlite in storage) is not theirs to reach when nodes keep their own copy of storage."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri or "sqlite:///<storage>/mlflow.db"
    training = [s.name for s in stages if s.resumable]
    if training and (uri.startswith(("sqlite:", "file:")) or "://" not in uri):
        raise ConfigError(f"MLflow tracking store {uri} is a file on the driver's node, and {', '.join(training)} log to "
                          f"it from workers on other nodes ({', '.join(mirrors.nodes.values())}), which keep their own "
                          "copy of storage; set MLFLOW_TRACKING_URI (or mlflow.tracking_uri) to a tracking server "
                          "(cluster/ has one)")


def start_tracking(cfg: PipelineConfig, storage: Path) -> str:
    """Point MLflow at $MLFLOW_TRACKING_URI, else the config's URI, else a sqlite file in storage;
    returns the URI. With the default store, the experiment's artifacts live in storage too
    (`<storage>/mlruns`; MLflow's own default is ./mlruns of the working directory), so one
    directory holds a whole run. A server or an explicit store keeps its own artifact root."""
    explicit = os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri
    tracking_uri = explicit or f"sqlite:///{storage}/mlflow.db"
    mlflow.set_tracking_uri(tracking_uri)
    if not explicit and mlflow.get_experiment_by_name(cfg.mlflow.experiment) is None:
        try:
            mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=(storage / "mlruns").as_uri())
        except MlflowException as e:  # created meanwhile by a concurrent run
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    experiment = mlflow.set_experiment(cfg.mlflow.experiment)
    if not explicit and not experiment.artifact_location.startswith((storage / "mlruns").as_uri()):
        # MLflow records absolute artifact paths: a storage moved or copied here keeps writing where it was made
        console.print(f"[yellow]note[/]: experiment {cfg.mlflow.experiment!r} of {tracking_uri} keeps its artifacts in "
                      f"{experiment.artifact_location}, outside this storage (it was made there and then moved or copied "
                      "here, or made by an older version); new runs' artifacts go there too")
    return tracking_uri


def output_settings(stage_cfg) -> dict[str, Any]:
    """The stage settings that decide its output: all but those marked EXECUTION_ONLY
    (processes, threads, actor counts), so re-tuning a finished stage does not redo it, and those
    marked APPENDED_INPUT (appended URL lists: external inputs, fingerprinted by content)."""
    fields = type(stage_cfg).model_fields
    marks = {name: f.json_schema_extra for name, f in fields.items() if isinstance(f.json_schema_extra, dict)}
    excluded = {name for name, extra in marks.items() if extra.get("execution_only") or extra.get("appended_input")}
    return stage_cfg.model_dump(mode="json", exclude=excluded)


def ensure_ray(cfg: PipelineConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address)
        except ConnectionError as e:
            key = "ray.address" if cfg.ray.address else "RAY_ADDRESS"
            raise ConfigError(f"{key} {address}: cannot connect to a Ray cluster ({str(e).strip().splitlines()[0]}); start it, or unset {key} to run locally") from None
    else:
        object_store = cfg.ray.object_store_mb * 2**20 if cfg.ray.object_store_mb else None
        # Ray Train starts an actor per stage that watches for preempted (spot) nodes; an embedded
        # cluster has none, and each actor costs seconds of start-up on a small machine.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(num_cpus=cfg.ray.num_cpus, object_store_memory=object_store, include_dashboard=False)


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / MANIFEST).read_text())
    except (FileNotFoundError, ValueError):
        return None


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(_manifest_text(manifest))
    os.replace(tmp, out_dir / MANIFEST)
    (out_dir / STARTED).unlink(missing_ok=True)


def _manifest_text(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2)


def _manifest_digest(manifest: dict[str, Any] | None) -> str:
    """What downstream stages depend on: the upstream's fingerprint and what it produced."""
    manifest = manifest or {}
    return _digest({"fingerprint": manifest.get("fingerprint"), "counts": manifest.get("counts")})


def relocatable(value: Any, storage: Path) -> Any:
    """`value` with the storage folder's own path written as $STORAGE (in strings, lists, dicts): what a
    run's files are called in its fingerprints, so a storage moved or copied as a whole (or an object
    store's mirror elsewhere) is up to date where it was."""
    root = str(storage)
    if isinstance(value, str) and (value == root or value.startswith(root + os.sep)):
        return "$STORAGE" + value[len(root):]
    if isinstance(value, list):
        return [relocatable(v, storage) for v in value]
    if isinstance(value, dict):
        return {k: relocatable(v, storage) for k, v in value.items()}
    return value


def _checksum(uri: str, storage: Path) -> str:
    """An external input's version: a file of the run's own (a URL list `unclip retrain` copied in) by its
    bytes, as a moved copy has other metadata; anything else by its file system's checksum."""
    import fsspec

    if relocatable(uri, storage) != uri and os.path.isfile(uri):
        from pipelines.retrain import file_digest

        return file_digest(uri)
    fs, path = fsspec.core.url_to_fs(uri)
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    return _digest([(f, fs.checksum(f)) for f in files])


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
