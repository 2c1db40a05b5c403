"""Bad paths, URIs and stage names on the command line: exit code 2, one clear message naming the
option and the fix, no traceback, nothing written, no stage started (so no Ray either).
Also: with the default tracking store, MLflow artifacts live in the storage directory."""

import socket
from pathlib import Path

import fsspec
import mlflow
import pandas as pd
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from typer.testing import CliRunner

import pipelines.runner
from pipelines.cli import app
from pipelines.config import STAGE_ORDER, load_config
from pipelines.runner import run_pipeline

QUICK = str(Path(__file__).parents[1] / "pipelines" / "configs" / "quick.yaml")


def files_under(root: Path) -> set[Path]:
    return set(root.rglob("*"))


@pytest.fixture()
def cli(tmp_path, monkeypatch):
    """unclip in this process, from an empty working directory; checks what every error must do."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)

    def no_stage(*args, **kwargs):
        raise AssertionError("a stage started")

    monkeypatch.setattr(pipelines.runner, "run_stage", no_stage)
    monkeypatch.setattr(pipelines.runner, "ensure_ray", no_stage)

    def fails(*args) -> str:
        """Run `unclip *args`, expect exit 2 and no trace of work; returns the error message."""
        before = files_under(tmp_path)
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and result.stdout == ""
        assert result.stderr.startswith("error: ")
        assert files_under(tmp_path) == before
        return result.stderr

    return fails


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- issue 13's three reports -------------------------------------------------------------------
def test_missing_url_list(cli, tmp_path):
    missing = tmp_path / "missing.parquet"
    message = cli("run", QUICK, "--storage", tmp_path / "s", "--set", f"ingest.url_list={missing}")
    assert "ingest.url_list" in message and str(missing) in message and "does not exist" in message


class AccessDenied(MemoryFileSystem):
    """A remote store that refuses us, as S3 does without credentials."""

    protocol = "denied"

    def info(self, path, **kwargs):
        raise PermissionError("Access Denied\n(request id 123, host id abc)")


def test_remote_url_list_that_cannot_be_listed(cli, tmp_path):
    fsspec.register_implementation("denied", AccessDenied, clobber=True)
    message = cli("run", QUICK, "--storage", tmp_path / "s", "--set", "ingest.url_list=denied://bucket/urls/")
    assert "ingest.url_list denied://bucket/urls/: cannot be listed (PermissionError: Access Denied)" in message
    assert len(message.strip().splitlines()) == 1


@pytest.mark.parametrize("storage, reason", [
    ("/proc/nope", "/proc/nope cannot be created: making a directory in /proc fails"),
    ("ftp://bucket/out", "pyarrow has no file system for ftp:// URIs"),
    ("file:///tmp/out", "give the local path itself, not a URL"),
    ("", "storage is empty"),
])
def test_unusable_storage(cli, storage, reason):
    message = cli("run", QUICK, "--storage", storage)
    assert "storage" in message and reason in message and "--storage" in message


def test_storage_below_a_file(cli, tmp_path):
    (tmp_path / "file").write_text("x")
    assert f"{tmp_path / 'file'} is a file, not a directory" in cli("run", QUICK, "--storage", tmp_path / "file" / "out")


def test_default_tracking_store_keeps_artifacts_in_storage(tmp_path, monkeypatch):
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    storage = tmp_path / "store"
    cfg = load_config(QUICK, [f"storage={storage}", "synth.n=4", "synth.image_size=16"])
    run_pipeline(cfg, until="synth")

    client = mlflow.MlflowClient(f"sqlite:///{storage}/mlflow.db")
    experiment = client.get_experiment_by_name("unclip")
    assert experiment.artifact_location == (storage / "mlruns").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    assert {r.info.run_name for r in runs} == {"unclip-quick", "synth"}
    for run in runs:
        assert run.info.artifact_uri.startswith((storage / "mlruns").as_uri() + "/")
    assert list((storage / "mlruns").rglob("config.yaml"))  # the pipeline config artifact
    assert not (work / "mlruns").exists() and list(work.iterdir()) == []


def test_explicit_tracking_store_keeps_its_own_artifact_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/elsewhere.db")
    storage = tmp_path / "store"
    run_pipeline(load_config(QUICK, [f"storage={storage}", "synth.n=4", "synth.image_size=16"]), until="synth")
    location = mlflow.MlflowClient(f"sqlite:///{tmp_path}/elsewhere.db").get_experiment_by_name("unclip").artifact_location
    assert not location.startswith(storage.as_uri())


# --- the rest of the command line ---------------------------------------------------------------
def test_url_list_folder_without_files_of_the_format(cli, tmp_path):
    (tmp_path / "urls").mkdir()
    (tmp_path / "urls" / "a.csv").write_text("url,caption\n")
    message = cli("run", QUICK, "--storage", tmp_path / "s", "--set", f"ingest.url_list={tmp_path / 'urls'}")
    assert "ingest.url_list" in message and "without *.parquet files" in message and "ingest.input_format" in message


def test_url_list_in_another_format(cli, tmp_path):
    (tmp_path / "urls.csv").write_text("url,caption\nhttp://x/1.jpg,a cat\n")
    message = cli("run", QUICK, "--storage", tmp_path / "s", "--set", f"ingest.url_list={tmp_path / 'urls.csv'}")
    assert "cannot be read as parquet" in message and "set ingest.input_format=csv" in message


def test_url_list_without_the_configured_columns(cli, tmp_path):
    pd.DataFrame({"URL": ["http://x/1.jpg"], "TEXT": ["a cat"]}).to_parquet(tmp_path / "urls.parquet")
    message = cli("run", QUICK, "--storage", tmp_path / "s", "--set", f"ingest.url_list={tmp_path / 'urls.parquet'}")
    assert "'url' (ingest.url_col)" in message and "'caption' (ingest.caption_col)" in message and "['URL', 'TEXT']" in message


@pytest.mark.parametrize("args, message", [
    (["--only", "train_magic"], f"--only 'train_magic': no such stage (stages: {', '.join(STAGE_ORDER)})"),
    (["--only", "ingest,embed"], "repeat --only for several stages"),
    (["--until", "pca", "--set", "stages=[synth]"], "--until 'pca': not one of this config's stages (synth)"),
])
def test_unknown_stage_names(cli, tmp_path, args, message):
    assert message in cli("run", QUICK, "--storage", tmp_path / "s", *args)


def test_config_file_problems(cli, tmp_path):
    assert "config file" in cli("run", tmp_path / "none.yaml") and "does not exist" in cli("validate", tmp_path / "none.yaml")
    assert "is a directory, not a YAML file" in cli("run", tmp_path)
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00bad")
    assert "cannot be read (not UTF-8 text)" in cli("validate", tmp_path / "binary.yaml")
    (tmp_path / "broken.yaml").write_text("storage: [unclosed\n")
    assert "is not valid YAML" in cli("run", tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert "top level must be a mapping" in cli("validate", tmp_path / "list.yaml")


@pytest.mark.parametrize("override, message", [
    ("novalue", "expected KEY=VALUE"),
    ("ingest..threads=2", "expected KEY=VALUE"),
    ("=3", "expected KEY=VALUE"),
    ("ingest.additional_columns=[a, b", "the value is not valid YAML"),
    ("seed.x=1", "'seed' is not a section"),
    ("mlflow.experiment.x=1", "mlflow.experiment: Input should be a valid string"),
    ("ingest.bogus=1", "ingest.bogus: unknown key"),
])
def test_malformed_set(cli, override, message):
    assert message in cli("run", QUICK, "--set", override)
    assert message in cli("validate", QUICK, "--set", override)


def test_tracking_uri_problems(cli, tmp_path):
    base = ["run", QUICK, "--storage", tmp_path / "s", "--set"]
    assert "mlflow.tracking_uri htp://x: MLflow has no tracking store for htp URIs" in cli(*base, "mlflow.tracking_uri=htp://x")
    assert "/proc/nope cannot be created" in cli(*base, "mlflow.tracking_uri=sqlite:////proc/nope/m.db")
    server = f"http://127.0.0.1:{closed_port()}"
    message = cli(*base, f"mlflow.tracking_uri={server}")
    assert f"mlflow.tracking_uri {server}: cannot reach the tracking server" in message and "Connection refused" in message


def test_tracking_uri_from_the_environment_is_named(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "htp://x")
    assert "MLFLOW_TRACKING_URI htp://x:" in cli("run", QUICK, "--storage", tmp_path / "s")


def test_ray_address_that_does_not_answer(cli, tmp_path, monkeypatch):
    address = f"127.0.0.1:{closed_port()}"
    assert f"ray.address {address}: nothing answers" in cli("run", QUICK, "--storage", tmp_path / "s", "--set", f"ray.address={address}")
    monkeypatch.setenv("RAY_ADDRESS", "not-an-address")
    assert "RAY_ADDRESS not-an-address: expected host:port" in cli("run", QUICK, "--storage", tmp_path / "s")


def test_embed_model_files(cli, tmp_path):
    (tmp_path / "clip.pt").write_bytes(b"pickle")
    message = cli("run", QUICK, "--storage", tmp_path / "s", "--set", "embed.clip_arch=arch.json", "--set", f"embed.clip_pretrained={tmp_path / 'clip.pt'}")
    assert f"embed.clip_arch 'arch.json': {tmp_path / 's' / 'arch.json'} does not exist" in message
    assert "embed.clip_pretrained" in message and "pickled checkpoint" in message and ".safetensors" in message


def test_several_problems_are_reported_together(cli, tmp_path):
    message = cli("run", QUICK, "--storage", "/proc/nope", "--set", f"ingest.url_list={tmp_path / 'none.parquet'}")
    assert message.startswith("error: the run cannot start:\n") and "storage" in message and "ingest.url_list" in message


def test_synth_out_unwritable(cli, tmp_path):
    assert "--out: /proc/nope cannot be created" in cli("synth", "--out", "/proc/nope", "--n", "2")
    (tmp_path / "file").write_text("x")
    assert "is a file, not a directory" in cli("synth", "--out", tmp_path / "file", "--n", "2")


def test_validate_checks_paths_on_request(cli, tmp_path):
    args = ["validate", QUICK, "--storage", tmp_path / "s", "--set", f"ingest.url_list={tmp_path / 'none.parquet'}"]
    assert CliRunner().invoke(app, [str(a) for a in args]).exit_code == 0
    assert "ingest.url_list" in cli(*args, "--check-paths")
    assert "needs the output of 'synth'" in cli("validate", QUICK, "--set", "stages=[ingest]")


@pytest.mark.parametrize("storage", ["out #1", "123", "a: b"])
def test_storage_option_is_taken_literally(tmp_path, monkeypatch, storage):
    seen = {}
    monkeypatch.setattr(pipelines.runner, "run_pipeline", lambda cfg, **kw: seen.setdefault("storage", cfg.storage))
    result = CliRunner().invoke(app, ["run", QUICK, "--storage", storage])
    assert result.exit_code == 0, result.output
    assert seen["storage"] == storage


def test_missing_init_from(cli, tmp_path):
    missing = tmp_path / "karlo" / "decoder"
    message = cli("run", QUICK, "--storage", tmp_path / "s", "--set", f"train_decoder.init_from={missing}")
    assert "train_decoder.init_from" in message and str(missing) in message and "does not exist" in message
