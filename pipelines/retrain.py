"""`unclip retrain`: new data for a finished run, every model warm-started from the champion.

    unclip retrain pipelines/configs/demo.yaml --storage /tmp/u1 --new-urls more.parquet
    unclip retrain pipelines/configs/laion.yaml --new-urls s3://bucket/incoming/   # a schedule's inbox

With storage on an object store the state below lives in the store (the local mirror gets a copy:
`open_storage`), so any machine that runs the storage applies it.

`--new-urls` names URL list files, or folders whose every *.<ingest.input_format> file is a list (an
inbox that a scheduled retrain re-reads: the lists already in the run are not new).

1. Each new URL list is copied into the run (`<storage>/_pipeline/urls/<digest>.<format>`) and
   recorded in `<storage>/_pipeline/retrain.json` (relative to the storage, which may move). Every
   later `unclip run` or `retrain` on this storage appends the recorded lists to the config's input
   (`ingest.extra_url_lists`), so ingest downloads, and embed encodes, only the new shards.
2. The registered champion (`models:/<register.model_name>@champion`) is downloaded to
   `<storage>/_pipeline/champion/v<N>/`. Each training stage starts from its part (`init_from`)
   and counts on from the step that part reached (`start_step`, from the version's
   `unclip.step.<part>` tag) for its configured `steps`, on old + new data.
3. Then the pipeline runs as usual: pca, the training stages, evaluate and register rerun because
   their inputs changed, and register moves `champion` only by its metric rule.
The warm start is recorded with the retrain, and every later `unclip run` on this storage starts the
training stages where the latest retrain did: the retrained models are that run's, up to date, not
trained again from the config's own start.

The CLIP stays the one this run embedded with (train_clip does not run): the new rows must be
embedded in the space of the old ones, which is also the space the champion's prior and decoder
learnt.

Idempotent: a retrain is keyed by the content digests of its new lists. A list already in the
run's data is not new, and when nothing is new nothing runs. A retrain that did not finish (a
crash) is finished by the same command: same champion, and the stages resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, PipelineConfig
from pipelines.object_store import ObjectStore, is_remote, local_storage
from tasks.context import one_line

STATE = "retrain.json"  # under <storage>/_pipeline/
URLS_DIR = "urls"
CHAMPION_DIR = "champion"
FROZEN_STAGES = ("train_clip",)  # the embedding space stays the champion's


def state_file(storage: Path) -> Path:
    return Path(storage).absolute() / "_pipeline" / STATE


def read_state(storage: Path) -> dict[str, Any]:
    path = state_file(storage)
    return parse_state(path.read_text(), path) if path.is_file() else {"url_lists": [], "retrains": []}


def parse_state(text: str, where: Path | str) -> dict[str, Any]:
    try:
        return json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{where} is not valid JSON ({e}); restore it, or remove it to forget the added URL lists") from None


def write_state(storage: Path, state: dict[str, Any], store: ObjectStore | None = None) -> None:
    path = state_file(storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(state, indent=2)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    if store:
        store.write_text(f"_pipeline/{STATE}", text)


def open_storage(cfg: PipelineConfig) -> tuple[Path, ObjectStore | None]:
    """The directory the stages of `cfg` run in, and its object store if it is on one. The store's
    retrain state is the truth: it is copied into the local mirror with the files it names (the
    added URL lists, the latest retrain's champion), as a fresh mirror has none of them."""
    from pipelines.checks import preflight

    storage = local_storage(cfg.storage)
    if not is_remote(cfg.storage):
        return storage, None
    preflight(cfg, [])  # the store is reachable and writable (a clear error otherwise) before it is read
    store = ObjectStore.connect(cfg.storage)
    text = store.read_text(f"_pipeline/{STATE}")
    if text is not None:
        state = parse_state(text, f"{store.uri}/_pipeline/{STATE}")
        needed = [entry["file"] for entry in state["url_lists"]]
        if state["retrains"]:
            needed.append(champion_dir(state["retrains"][-1]["champion"]))
        for relpath in needed:
            if not (storage / relpath).exists():
                store.download(relpath, storage / relpath)
        write_state(storage, state)
    return storage, store


def champion_dir(version: str) -> str:
    return f"_pipeline/{CHAMPION_DIR}/v{version}"


def with_retrain_state(cfg: PipelineConfig, storage: Path) -> PipelineConfig:
    """cfg as `unclip retrain` left its `storage` directory: its ingest input also has the URL lists retrains
    added, and its training stages start from the latest retrain's warm start (`init_from`, `start_step`)."""
    state = read_state(storage)
    added = [str(storage / entry["file"]) for entry in state["url_lists"]]
    extra = cfg.ingest.extra_url_lists + [f for f in added if f not in cfg.ingest.extra_url_lists]
    updates = {}
    if extra != cfg.ingest.extra_url_lists:
        updates["ingest"] = cfg.ingest.model_copy(update={"extra_url_lists": extra})
    latest = state["retrains"][-1] if state["retrains"] else {}
    for stage, start in latest.get("warm_start", {}).items():
        updates[stage] = getattr(cfg, stage).model_copy(update={**start, "init_from": str(storage / start["init_from"])})
    return cfg.model_copy(update=updates) if updates else cfg


def kept_by_retrain(cfg: PipelineConfig, storage: Path, store: ObjectStore | None) -> list[str]:
    """The FROZEN_STAGES a retrain of this storage kept: finished, and not to run again on the grown data
    (the embedding space stays the one the retrained models learnt)."""
    from pipelines.runner import finished_manifest

    if not read_state(storage)["retrains"]:
        return []
    return [s for s in FROZEN_STAGES if s in cfg.stages and finished_manifest(s, storage, store) is not None]


def url_list_files(new_urls: list[str], input_format: str) -> list[str]:
    """The list files `--new-urls` names: each file, and each folder's *.<input_format> files."""
    from tasks.ingest import url_list_files as files_at

    found = []
    for url_list in new_urls:
        try:
            fs, files = files_at(url_list, input_format)
        except Exception as e:  # no credentials, no network: the reason, in one line
            raise ConfigError(f"--new-urls {url_list}: cannot be listed ({one_line(e)}); check the path and your access to it") from None
        if files is None:
            raise ConfigError(f"--new-urls {url_list} does not exist; give an existing URL list file or folder")
        local = "file" in fs.protocol  # local paths stay paths; remote ones keep their scheme (s3://...)
        found += files if local else [fs.unstrip_protocol(f) for f in files]
    return found


def file_digest(url_list: str) -> str:
    """sha256 of a URL list file's bytes (local or any fsspec URL)."""
    import fsspec

    digest = hashlib.sha256()
    with fsspec.open(url_list, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()[:20]


def copy_into_run(url_list: str, digest: str, storage: Path, input_format: str) -> Path:
    import fsspec

    target = storage / "_pipeline" / URLS_DIR / f"{digest}.{input_format}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.is_file():
        tmp = target.with_name(f".{target.name}.tmp")
        with fsspec.open(url_list, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, target)
    return target


def retrain(cfg: PipelineConfig, new_urls: list[str], console) -> dict[str, Any] | None:
    """Add `new_urls` to the run's data and retrain from the champion; None when nothing is new."""
    from tasks.ingest import check_url_list

    storage, store = open_storage(cfg)
    where = store.uri if store else storage
    has_run = store.read_text("_pipeline/config.yaml") is not None if store else (storage / "_pipeline" / "config.yaml").is_file()
    if not has_run:
        raise ConfigError(f"{where} holds no pipeline run (no _pipeline/config.yaml); run it first: "
                          f"unclip run <config> --storage {where}")
    state = read_state(storage)
    digests = {}
    for url_list in url_list_files(new_urls, cfg.ingest.input_format):
        settings = cfg.ingest.model_copy(update={"url_list": url_list, "additional_columns": cfg.ingest.additional_columns if cfg.ingest.url_list else []})
        if problems := check_url_list(settings, f"--new-urls {url_list}"):
            raise ConfigError(problems[0])
        digests.setdefault(file_digest(url_list), url_list)
    known = {entry["digest"] for entry in state["url_lists"]}
    pending = next((r for r in state["retrains"] if not r.get("finished_at")), None)
    if pending and not set(pending["url_lists"]) <= set(digests):
        raise ConfigError(f"the retrain with {pending['sources']} (started {pending['started_at']}) did not finish; "
                          "finish it first: run the same `unclip retrain` command again")
    if pending:
        console.print(f"[yellow]note[/]: finishing the retrain started {pending['started_at']}; lists added since wait for the next retrain")
        retraining = pending
    else:
        new = {d: u for d, u in digests.items() if d not in known}
        if not new:
            console.print(f"nothing new: every URL list in {', '.join(new_urls)} is already in the data of {where}; not retraining")
            return None
        now = datetime.now(timezone.utc).isoformat()
        for digest, url_list in new.items():
            file = copy_into_run(url_list, digest, storage, cfg.ingest.input_format)
            state["url_lists"].append({"file": str(file.relative_to(storage)), "source": url_list, "digest": digest, "added_at": now})
        retraining = {"url_lists": sorted(new), "sources": list(new.values()), "started_at": now,
                      "champion": champion_version(cfg, storage)}
        state["retrains"].append(retraining)

    retraining["warm_start"] = warm_start(cfg, storage, retraining["champion"], console)
    if store:  # the files the state names first: the store's state never names a missing one
        lists = {entry["digest"]: entry["file"] for entry in state["url_lists"]}
        for relpath in [lists[d] for d in retraining["url_lists"]] + [champion_dir(retraining["champion"])]:
            store.upload(storage / relpath, relpath)
    write_state(storage, state, store)  # before the stages: from here on every run of this storage starts from it
    from pipelines.runner import run_pipeline

    run_pipeline(cfg)  # which keeps the FROZEN_STAGES (kept_by_retrain)
    registered = None
    if "register" in cfg.stages:
        if store:  # skipped as up to date, register's output may be in the store only
            store.pull("register", storage / "register")
        registered = json.loads((storage / "register" / "registered.json").read_text())
    retraining.update(finished_at=datetime.now(timezone.utc).isoformat(), registered=registered)
    write_state(storage, state, store)
    return retraining


def champion_version(cfg: PipelineConfig, storage: Path) -> str:
    import mlflow

    from pipelines.runner import start_tracking
    from tasks.register import CHAMPION, current_champion

    tracking_uri = start_tracking(cfg, storage)
    champion = current_champion(mlflow.MlflowClient(), cfg.register.model_name)
    if champion is None:
        raise ConfigError(f"no registered model {cfg.register.model_name!r} with alias {CHAMPION!r} in {tracking_uri}; "
                          "retrain warm-starts from it: run the pipeline with its register stage first")
    return str(champion.version)


def warm_start(cfg: PipelineConfig, storage: Path, version: str, console) -> dict[str, dict[str, Any]]:
    """{training stage: its init_from and start_step}: champion `version`'s part, counting on from its steps."""
    import mlflow

    from pipelines.runner import start_tracking
    from tasks.register import STEP_TAG
    from tasks.stack import STAGE_OF

    tracking_uri = start_tracking(cfg, storage)
    name = cfg.register.model_name
    tags = mlflow.MlflowClient().get_model_version(name, version).tags
    parts = download_champion(f"models:/{name}/{version}", storage / champion_dir(version), tracking_uri)
    updates, started = {}, []
    for part, stage in STAGE_OF.items():
        if stage not in cfg.stages:
            continue
        if parts.get(part) is None:
            console.print(f"[yellow]note[/]: champion v{version} has no {part}; {stage} starts from its config")
            continue
        start_step = int(tags.get(STEP_TAG + part, 0))
        updates[stage] = {"init_from": str(parts[part].relative_to(storage)), "start_step": start_step}
        started.append(f"{stage} from step {start_step}")
    console.print(f"[bold]retrain[/] from champion {name} v{version}: {', '.join(started)}")
    return updates


def download_champion(model_uri: str, target: Path, tracking_uri: str) -> dict[str, Path | None]:
    """The champion's part directories, downloaded once into `target` (kept: a resumed stage reads them again)."""
    from tasks.stack import StackError, find_parts, resolve_model

    try:
        return find_parts(target)
    except StackError:
        shutil.rmtree(target, ignore_errors=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        resolve_model(model_uri, tmp, tracking_uri=tracking_uri)
    except StackError as e:
        raise ConfigError(f"{model_uri}: {e}") from None
    os.replace(tmp, target)
    return find_parts(target)
