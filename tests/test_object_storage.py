"""Pipeline storage on an S3-compatible store (moto's server on 127.0.0.1): the store holds every
finished stage, a fresh local mirror resumes from it, a failed stage or upload publishes no
manifest, and a store that cannot be used is a clear error (exit 2) before anything runs."""

import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import pytest
from pyarrow import fs as pafs
from typer.testing import CliRunner

from pipelines import object_store, runner
from pipelines.cli import app
from pipelines.config import PipelineConfig
from pipelines.dag import DAG, Stage
from pipelines.object_store import ObjectStore, ObjectStoreError
from tasks import train_prior
from tests.mlflow_helpers import use_sqlite_store
from tests.test_runner import DATA_HALF, QUICK, unclip
from tests.train_helpers import train_inputs  # noqa: F401  (fixture)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's standalone S3 server; yields its endpoint URL."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    moto = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"moto_server did not start; see {log.name}")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)
    log.close()


@pytest.fixture()
def bucket(s3_server, monkeypatch, tmp_path):
    """A new, empty bucket; credentials and endpoint in the environment only, as a user sets them."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv(object_store.MIRROR_ENV, str(tmp_path / "mirror"))
    name = f"b{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_server, scheme="http", access_key="testing", secret_key="testing",
                      region="us-east-1", allow_bucket_creation=True).create_dir(name)
    return name


def store_files(uri: str) -> set[str]:
    """Every object under uri, relative to it."""
    fs, root = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File}


def test_quick_pipeline_on_s3_and_resume_from_a_fresh_mirror(bucket, tmp_path, monkeypatch):
    uri = f"s3://{bucket}/run"
    args = ("run", QUICK, "--storage", uri, *DATA_HALF, "--set", "synth.n=30", "--set", "pca.kept_dims=16")
    first = unclip(*args, cwd=tmp_path)
    for stage in ("synth", "ingest", "embed", "pca"):
        assert f"✓  {stage}" in first.stderr
    files = store_files(uri)
    assert "_pipeline/config.yaml" in files
    for stage in ("synth", "ingest", "embed", "pca"):
        assert f"{stage}/_manifest.json" in files
    assert not any(f.endswith("/.started") for f in files)
    assert {"ingest/00000.tar", "ingest/00000.parquet"} <= files
    assert any(f.startswith("embed/") and f.endswith(".parquet") for f in files)
    assert any(f.startswith("pca/") and f.endswith(".safetensors") for f in files)
    fs, root = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(f"{root}/ingest/_manifest.json") as f:
        assert json.loads(f.read())["counts"]["success"] == 30
    # what the store holds is what the stage wrote
    mirror = tmp_path / "mirror"
    with fs.open_input_stream(f"{root}/ingest/00000.tar") as f:
        assert f.read() == (mirror / "ingest" / "00000.tar").read_bytes()

    # another machine: an empty mirror; every stage is done in the store, nothing is downloaded
    fresh = tmp_path / "fresh-mirror"
    monkeypatch.setenv(object_store.MIRROR_ENV, str(fresh))
    second = unclip(*args, cwd=tmp_path)
    for stage in ("synth", "ingest", "embed", "pca"):
        assert f"{stage}: up to date" in second.stderr
    assert not any((fresh / stage).exists() for stage in ("synth", "ingest", "embed", "pca"))


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """One MLflow store for the in-process stage runs (creating a sqlite store takes seconds)."""
    use_sqlite_store(tmp_path_factory.mktemp("mlflow") / "mlflow.db")
    yield
    mlflow.set_tracking_uri(None)


def synth_config(n: int) -> PipelineConfig:
    return PipelineConfig.model_validate({"stages": ["synth"], "synth": {"n": n}})


def test_a_failed_stage_or_upload_publishes_no_manifest(bucket, tmp_path, tracking, monkeypatch):
    store = ObjectStore.connect(f"s3://{bucket}/run")
    mirror = tmp_path / "mirror"

    def half_then_fail(cfg, ctx):
        (ctx.out_dir / "part-0").write_text("half")
        raise RuntimeError("stage died mid-way")

    with pytest.raises(RuntimeError, match="mid-way"):
        runner.run_stage(Stage("synth", half_then_fail), synth_config(3), mirror, store)
    assert store_files(store.uri) == set()

    def works(cfg, ctx):
        (ctx.out_dir / f"part-{cfg.n}").write_text(str(cfg.n))
        return {"n": cfg.n}

    assert runner.run_stage(Stage("synth", works), synth_config(3), mirror, store)["status"] == "ran"
    assert {"synth/_manifest.json", "synth/part-3"} <= store_files(store.uri)

    # a redo that dies before publishing leaves the store's previous finished output as it was
    with pytest.raises(RuntimeError, match="mid-way"):
        runner.run_stage(Stage("synth", half_then_fail), synth_config(4), mirror, store)
    assert store.read_manifest("synth")["counts"] == {"n": 3.0}

    # the upload breaks after the files went up: no manifest, neither the new nor the old one
    real_copy = pafs.copy_files

    def copy_then_break(*args, **kwargs):
        real_copy(*args, **kwargs)
        raise OSError("connection reset")

    monkeypatch.setattr(pafs, "copy_files", copy_then_break)
    with pytest.raises(ObjectStoreError, match="uploading synth/ failed"):
        runner.run_stage(Stage("synth", works), synth_config(4), mirror, store)
    assert "synth/part-4" in store_files(store.uri) and store.read_manifest("synth") is None
    assert not (mirror / "synth" / "_manifest.json").exists()  # nor does the mirror claim it is done

    monkeypatch.setattr(pafs, "copy_files", real_copy)
    assert runner.run_stage(Stage("synth", works), synth_config(4), mirror, store)["status"] == "ran"
    assert store.read_manifest("synth")["counts"] == {"n": 4.0}
    assert "synth/part-3" not in store_files(store.uri)  # the old output went when the stage was redone


def test_an_incremental_stage_grows_from_the_store_on_a_fresh_mirror(bucket, tmp_path, tracking):
    """A new machine pulls the store's finished output of an incremental stage whose input grew,
    and adds to it instead of starting over."""
    store = ObjectStore.connect(f"s3://{bucket}/run")
    url_list = tmp_path / "urls.txt"
    seen = []

    def add_what_is_new(cfg, ctx):
        seen.append(sorted(p.name for p in ctx.out_dir.iterdir() if not p.name.startswith(".")))
        for line in url_list.read_text().split():
            (ctx.out_dir / line).write_text(line)
        return {"n": len(url_list.read_text().split())}

    stage = Stage("synth", add_what_is_new, incremental=True, external_inputs=lambda cfg: [str(url_list)])
    url_list.write_text("a b")
    runner.run_stage(stage, synth_config(3), tmp_path / "machine1", store)
    url_list.write_text("a b c")
    assert runner.run_stage(stage, synth_config(3), tmp_path / "machine2", store)["status"] == "ran"
    assert seen == [[], ["a", "b"]]
    assert {"synth/a", "synth/b", "synth/c"} <= store_files(store.uri)
    assert store.read_manifest("synth")["counts"] == {"n": 3.0}
    assert runner.run_stage(stage, synth_config(3), tmp_path / "machine3", store)["status"] == "skipped"


@pytest.mark.slow
def test_a_training_stage_resumes_from_the_stores_checkpoints_on_another_machine(s3_server, bucket, tmp_path, tracking,
                                                                                 train_inputs):
    """Ray Train checkpoints a training stage into the store as it goes, so a machine with an empty
    mirror resumes it where the lost one stopped, in the same MLflow run; other settings start over."""
    # keys in the filesystem itself: this test's Ray workers were started before the bucket fixture set AWS_*
    fs = pafs.S3FileSystem(endpoint_override=s3_server, scheme="http", access_key="testing", secret_key="testing",
                           region="us-east-1")
    store = ObjectStore(f"s3://{bucket}/run", fs, f"{bucket}/run")
    store.publish("embed", train_inputs.embed, json.dumps({"stage": "embed", "fingerprint": "e", "counts": {}}))

    def settings(steps: int) -> PipelineConfig:
        return PipelineConfig.model_validate({"stages": ["embed", "train_prior"], "train_prior": {
            "steps": steps, "batch_size": 16, "checkpoint_every": 10, "log_every": 5, "val_fraction": 0.0}})

    def lose_the_machine_at_step_10(cfg, ctx):
        train_prior.run(cfg.model_copy(update={"steps": 10}), ctx)
        raise RuntimeError("machine lost")

    lost = Stage("train_prior", lose_the_machine_at_step_10, inputs=DAG["train_prior"].inputs, resumable=True,
                 needs_ray=True)
    with pytest.raises(runner.StageFailed, match="machine lost"):
        runner.run_stage(lost, settings(20), tmp_path / "machine1", store)
    files = store_files(store.uri)
    assert "train_prior/ray_train/checkpoint_manager_snapshot.json" in files
    assert "train_prior/_manifest.json" not in files
    assert not (tmp_path / "machine1" / "train_prior" / "ray_train").exists()  # in the store, not the mirror
    first_run_id = store.read_text("train_prior/.mlflow_run_id")

    resumed = runner.run_stage(DAG["train_prior"], settings(20), tmp_path / "machine2", store)
    assert resumed["counts"]["resumed_from_step"] == 10 and resumed["counts"]["steps"] == 20
    assert store.read_manifest("train_prior")["counts"]["steps"] == 20
    files = store_files(store.uri)
    assert "train_prior/ema/config.json" in files and "train_prior/.started" not in files
    assert (tmp_path / "machine2" / "train_prior" / ".mlflow_run_id").read_text() == first_run_id

    # other settings: a new attempt; the store's checkpoints (kept with the published stage) are not its to resume
    redone = runner.run_stage(DAG["train_prior"], settings(10), tmp_path / "machine3", store)
    assert redone["counts"]["resumed_from_step"] == 0 and redone["counts"]["steps"] == 10


def fails_before_anything_runs(tmp_path, monkeypatch, *args) -> str:
    def no_stage(*a, **kw):
        raise AssertionError("a stage started")

    monkeypatch.setattr(runner, "run_stage", no_stage)
    monkeypatch.setattr(runner, "ensure_ray", no_stage)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stderr.startswith("error: ")
    assert not (tmp_path / "mirror").exists()
    return result.stderr


def test_missing_bucket_is_a_clear_error(bucket, tmp_path, monkeypatch):
    uri = "s3://no-such-bucket-here/run"
    message = fails_before_anything_runs(tmp_path, monkeypatch, "run", QUICK, "--storage", uri)
    assert f"storage {uri}: cannot write there" in message and "AWS_ENDPOINT_URL" in message

    # without credentials the message says so (moto takes unsigned requests; a real store refuses them)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup
    assert "AWS_ACCESS_KEY_ID is not set" in fails_before_anything_runs(tmp_path, monkeypatch, "run", QUICK, "--storage", uri)


def test_unreachable_endpoint_is_a_clear_error(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    uri = f"s3://{bucket}/run"
    message = fails_before_anything_runs(tmp_path, monkeypatch, "run", QUICK, "--storage", uri)
    assert f"storage {uri}: cannot reach the store" in message and "AWS_ENDPOINT_URL" in message
    assert len(message.strip().splitlines()) == 1


def test_retrain_keeps_its_state_in_the_store_and_a_fresh_mirror_applies_it(bucket, tmp_path, monkeypatch):
    """`unclip retrain --storage s3://...` needs a run in the store, then goes on to the champion, and
    puts nothing in the store before it has one. The state a retrain leaves in the store (retrain.json,
    the added list, the champion's parts) is applied on a machine with an empty mirror: the list and
    the warm start at that mirror's paths, and train_clip, finished in the store, kept."""
    import pandas as pd

    from pipelines.config import load_config
    from pipelines.retrain import kept_by_retrain, open_storage, with_retrain_state, write_state

    uri = f"s3://{bucket}/run"
    new = tmp_path / "more.parquet"
    pd.DataFrame({"url": ["http://127.0.0.1:9/a.png"], "caption": ["a red circle"]}).to_parquet(new)
    retrain = ["retrain", str(QUICK), "--storage", uri, "--new-urls", str(new)]
    monkeypatch.chdir(tmp_path)
    no_run = CliRunner().invoke(app, retrain)
    assert no_run.exit_code == 2 and f"{uri} holds no pipeline run" in no_run.stderr
    store = ObjectStore.connect(uri)
    store.write_text("_pipeline/config.yaml", "name: x\n")
    no_champion = CliRunner().invoke(app, retrain)
    mlflow.set_tracking_uri(None)  # the command ran in this process and pointed MLflow at its mirror's store
    assert no_champion.exit_code == 2 and "no registered model 'unclip'" in no_champion.stderr, no_champion.output
    assert store_files(uri) == {"_pipeline/config.yaml"}

    # what a retrain from champion v3 leaves in the store: the list and the part, then the state naming them
    prior = "_pipeline/champion/v3/artifacts/prior"
    (tmp_path / "prior").mkdir()
    (tmp_path / "prior" / "config.json").write_text("{}")
    store.upload(new, "_pipeline/urls/abc.parquet")
    store.upload(tmp_path / "prior", prior)
    state = {"url_lists": [{"file": "_pipeline/urls/abc.parquet", "source": str(new), "digest": "abc"}],
             "retrains": [{"url_lists": ["abc"], "champion": "3", "warm_start": {"train_prior": {"init_from": prior, "start_step": 300}}}]}
    write_state(tmp_path / "mirror", state, store)
    store.write_text("train_clip/_manifest.json", "{}")

    fresh = tmp_path / "fresh"
    monkeypatch.setenv(object_store.MIRROR_ENV, str(fresh))
    cfg = load_config(QUICK, [f"storage={uri}"])
    storage, store = open_storage(cfg)
    assert storage == fresh and json.loads((fresh / "_pipeline" / "retrain.json").read_text()) == state
    cfg = with_retrain_state(cfg, storage)
    assert cfg.ingest.extra_url_lists == [str(fresh / "_pipeline" / "urls" / "abc.parquet")]
    assert (fresh / "_pipeline" / "urls" / "abc.parquet").read_bytes() == new.read_bytes()
    assert (cfg.train_prior.init_from, cfg.train_prior.start_step) == (str(fresh / prior), 300)
    assert (fresh / prior / "config.json").is_file()
    assert kept_by_retrain(cfg, storage, store) == ["train_clip"]


def test_mirror_location(monkeypatch):
    monkeypatch.delenv(object_store.MIRROR_ENV, raising=False)
    a, b = object_store.local_mirror("s3://bucket/a"), object_store.local_mirror("s3://bucket/b")
    assert a != b and a == object_store.local_mirror("s3://bucket/a/") and a.parent.name == "unclip"
    assert object_store.is_remote("s3://b/x") and object_store.is_remote("gs://b/x")
    assert not object_store.is_remote("outputs/x") and not object_store.is_remote("file:///tmp/x")


def test_mirror_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(object_store.MIRROR_ENV, str(tmp_path / "m"))
    assert object_store.local_storage("s3://bucket/a") == tmp_path / "m"
