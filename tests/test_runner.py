"""The runner end to end through the real CLI: skip, crash + resume, incremental growth, MLflow."""

import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.bad_web import image_server, jpeg_bytes
from tests.mlflow_helpers import use_sqlite_store

QUICK = Path(__file__).parents[1] / "pipelines" / "configs" / "quick.yaml"


def data_half(*then: str) -> tuple[str, ...]:
    """--set options for quick.yaml's data half, embedded by the random tiny CLIP its embed config
    names (no train_clip), then the stages `then`."""
    stages = ", ".join(("synth", "ingest", "embed", "pca", *then))
    return ("--set", f"stages=[{stages}]", "--set", "embed.clip_from=config")


DATA_HALF = data_half()


def unclip(*args, cwd, check=True, **popen):
    cmd = [sys.executable, "-m", "pipelines.cli", *map(str, args)]
    # mlflow.set_tracking_uri in this process (other tests) exports MLFLOW_TRACKING_URI: drop it
    # so the CLI uses its default, <storage>/mlflow.db.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"unclip {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


def shard_contents(ingest_dir: Path) -> dict[str, bytes]:
    """name -> bytes of every jpg and txt in the shards (json holds the URL, whose port varies)."""
    contents = {}
    for tar_path in sorted(ingest_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if not member.name.endswith(".json"):
                    contents[f"{tar_path.name}/{member.name}"] = tar.extractfile(member).read()
    return contents


def mlflow_runs(db: Path) -> pd.DataFrame:
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    return mlflow.search_runs(experiment_names=["unclip"])


def test_fingerprints_name_the_runs_own_files_relative_to_its_storage(tmp_path):
    from pipelines.runner import _checksum, relocatable

    storage = tmp_path / "run"
    settings = {"init_from": f"{storage}/_pipeline/champion/v1/prior", "lists": [str(storage), f"{storage}2/urls.csv"], "steps": 4}
    assert relocatable(settings, storage) == {"init_from": "$STORAGE/_pipeline/champion/v1/prior",
                                              "lists": ["$STORAGE", f"{storage}2/urls.csv"], "steps": 4}
    (storage / "urls").mkdir(parents=True)
    (storage / "urls" / "a.csv").write_text("url,caption\n")
    before = _checksum(f"{storage}/urls/a.csv", storage)
    moved = storage.rename(tmp_path / "moved")
    os.utime(moved / "urls" / "a.csv", (0, 0))  # a copy's metadata differs; its bytes are the same list
    assert _checksum(f"{moved}/urls/a.csv", moved) == before
    (moved / "urls" / "a.csv").write_text("url,caption\nhttp://127.0.0.1/x.png,x\n")
    assert _checksum(f"{moved}/urls/a.csv", moved) != before


def test_a_changed_setting_reruns_its_stage_and_an_execution_only_one_does_not(tmp_path):
    until_ingest = ("run", QUICK, "--storage", tmp_path / "store", "--set", "synth.n=30", "--until", "ingest")
    first = unclip(*until_ingest, cwd=tmp_path)
    assert "✓  synth" in first.stderr and "✓  ingest" in first.stderr
    manifest = yaml.safe_load((tmp_path / "store" / "ingest" / "_manifest.json").read_text())
    assert manifest["counts"]["success"] == 30 and manifest["package_version"]
    # a changed stage setting re-runs that stage (and the ones after it), not the ones before
    changed = unclip(*until_ingest, "--set", "ingest.image_size=32", cwd=tmp_path)
    assert "synth: up to date" in changed.stderr and "✓  ingest" in changed.stderr and "embed" not in changed.stderr
    # execution-only settings (processes, threads) do not invalidate a finished stage
    same = unclip(*until_ingest, "--set", "ingest.image_size=32", "--set", "ingest.processes=1", "--set", "ingest.threads=3", cwd=tmp_path)
    assert "ingest: up to date" in same.stderr


def test_mlflow_env_var_is_honoured(tmp_path):
    env_db = tmp_path / "elsewhere.db"
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", str(QUICK), "--storage", str(tmp_path / "s"), "--until", "synth", "--set", "synth.n=5"],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{env_db}"},
    )
    assert result.returncode == 0, result.stderr
    assert env_db.exists() and not (tmp_path / "s" / "mlflow.db").exists()
    assert sorted(mlflow_runs(env_db)["tags.mlflow.runName"]) == ["synth", "unclip-quick"]


def test_only_without_finished_inputs_is_a_clear_error(tmp_path):
    result = unclip("run", QUICK, "--storage", tmp_path / "s", "--only", "ingest", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "needs 'synth', which has not finished" in result.stderr


@pytest.fixture()
def slow_url_list(tmp_path):
    """40 images served one at a time with a delay, so that a run can be killed mid-way."""
    colours = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 210, 40)]
    routes = {f"/{i}.jpg": (200, {"Content-Type": "image/jpeg"}, jpeg_bytes(Image.new("RGB", (48, 48), colours[i % 4])), 0.12) for i in range(40)}
    with image_server(routes) as base:
        def write(n, path):
            pd.DataFrame({"url": [f"{base}/{i}.jpg" for i in range(n)], "caption": [f"caption {i}" for i in range(n)]}).to_parquet(path, index=False)
            return path
        yield write


def _ingest_config(tmp_path, url_list) -> Path:
    config = tmp_path / "ingest.yaml"
    config.write_text(yaml.safe_dump({
        "name": "ingest-only", "stages": ["ingest"], "progress": False,
        "ingest": {"url_list": str(url_list), "image_size": 16, "shard_size": 10, "processes": 1, "threads": 1, "timeout_s": 5},
    }))
    return config


def test_killed_ingest_leaves_no_manifest_and_rerun_matches_uninterrupted(tmp_path, slow_url_list):
    config = _ingest_config(tmp_path, slow_url_list(40, tmp_path / "urls.parquet"))
    unclip("run", config, "--storage", tmp_path / "clean", cwd=tmp_path)
    expected = shard_contents(tmp_path / "clean" / "ingest")
    assert len(expected) == 80

    crashed = tmp_path / "crashed" / "ingest"
    process = unclip("run", config, "--storage", tmp_path / "crashed", cwd=tmp_path, start_new_session=True)
    deadline = time.time() + 120
    while not list(crashed.glob("*_stats.json")) and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and img2dataset's workers, mid-download
    process.wait()
    assert 1 <= len(list(crashed.glob("*_stats.json"))) < 4
    assert not (crashed / "_manifest.json").exists()

    resumed = unclip("run", config, "--storage", tmp_path / "crashed", cwd=tmp_path)
    assert "resuming" in resumed.stderr
    assert (crashed / "_manifest.json").exists()
    assert shard_contents(crashed) == expected


def test_extended_url_list_downloads_only_new_shards(tmp_path, slow_url_list):
    urls = tmp_path / "urls.parquet"
    config = _ingest_config(tmp_path, slow_url_list(25, urls))
    storage = tmp_path / "s"
    unclip("run", config, "--storage", storage, cwd=tmp_path)
    ingest_dir = storage / "ingest"
    full_shard_times = {p.name: p.stat().st_mtime_ns for p in (ingest_dir / "00000.tar", ingest_dir / "00001.tar")}

    slow_url_list(38, urls)  # the list grows: shard 2 gets 5 more rows, shard 3 is new
    result = unclip("run", config, "--storage", storage, cwd=tmp_path)
    assert "✓  ingest" in result.stderr
    assert {p: (ingest_dir / p).stat().st_mtime_ns for p in full_shard_times} == full_shard_times
    manifest = yaml.safe_load((ingest_dir / "_manifest.json").read_text())
    assert manifest["counts"]["success"] == 38 and manifest["counts"]["shards_redone_partial"] == 1
    captions = sorted(v.decode() for k, v in shard_contents(ingest_dir).items() if k.endswith(".txt"))
    assert captions == sorted(f"caption {i}" for i in range(38))


def test_a_redone_stage_keeps_only_its_keep_paths(tmp_path, monkeypatch):
    """Stage.keep (evaluate's real-image statistics): a redo with other settings wipes the stage's
    output but the kept cache, and is a new MLflow run."""
    from pipelines import runner
    from pipelines.config import PipelineConfig
    from pipelines.dag import Stage

    def fake_synth(cfg, ctx):
        assert not (ctx.out_dir / "grid.png").exists()  # the previous run's output is gone
        (ctx.out_dir / "grid.png").write_text(str(cfg.n))
        (ctx.out_dir / "cache").mkdir(exist_ok=True)
        (ctx.out_dir / "cache" / f"n{cfg.n}").write_text("statistics")
        return {"n": cfg.n}

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    stage = Stage("synth", fake_synth, keep=("cache",))
    use_sqlite_store(tmp_path / "mlflow.db")
    for n in (3, 4):
        runner.run_stage(stage, PipelineConfig.model_validate({"stages": ["synth"], "synth": {"n": n}}), tmp_path)
    out = tmp_path / "synth"
    assert sorted(p.name for p in (out / "cache").iterdir()) == ["n3", "n4"]
    assert (out / "grid.png").read_text() == "4"
    assert len(mlflow.search_runs(experiment_names=["unclip"])) == 2


def test_a_crashed_resumable_stage_keeps_its_checkpoints_only_for_the_same_settings_and_inputs(tmp_path, monkeypatch):
    from pipelines import runner
    from pipelines.config import PipelineConfig
    from pipelines.dag import Stage

    seen = []

    def train_and_crash(cfg, ctx):
        seen.append(sorted(p.name for p in ctx.out_dir.iterdir() if not p.name.startswith(".")))
        (ctx.out_dir / "checkpoint").write_text("step 10")
        raise RuntimeError("crashed")

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    use_sqlite_store(tmp_path / "mlflow.db")
    stage = Stage("ingest", train_and_crash, inputs=lambda cfg: ("synth",), resumable=True)
    cfg = PipelineConfig.model_validate({"stages": ["synth", "ingest"]})
    (tmp_path / "synth").mkdir()
    for input_fingerprint in ("a", "a", "b"):  # the same input twice, then the input redone
        runner.write_manifest(tmp_path / "synth", {"stage": "synth", "fingerprint": input_fingerprint, "counts": {}})
        with pytest.raises(runner.StageFailed, match="crashed"):
            runner.run_stage(stage, cfg, tmp_path)
    assert seen == [[], ["checkpoint"], []]


def test_a_stage_that_leaves_a_sigint_handler_exiting_0_cannot_make_an_interrupt_look_like_success(tmp_path, monkeypatch):
    """img2dataset's download (and Ray Train's fit) install a SIGINT handler that calls sys.exit(0) and leave it:
    after the stage the runner's handler is back, and an exit 0 within the stage is an interrupt."""
    from pipelines import runner
    from pipelines.config import PipelineConfig
    from pipelines.dag import Stage

    def like_img2dataset(cfg, ctx):
        signal.signal(signal.SIGINT, lambda *args: sys.exit(0))
        return {"n": cfg.n}

    def interrupted(cfg, ctx):
        like_img2dataset(cfg, ctx)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # the handler runs first

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    use_sqlite_store(tmp_path / "mlflow.db")
    cfg = PipelineConfig.model_validate({"stages": ["synth"], "synth": {"n": 3}})
    before = signal.getsignal(signal.SIGINT)
    runner.run_stage(Stage("synth", like_img2dataset), cfg, tmp_path / "a")
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt):
        runner.run_stage(Stage("synth", interrupted), cfg, tmp_path / "b")
    assert signal.getsignal(signal.SIGINT) is before
    assert not (tmp_path / "b" / "synth" / "_manifest.json").exists()


def test_ctrl_c_in_training_after_ingest_ends_the_run_as_interrupted_not_as_a_success(tmp_path):
    """img2dataset leaves a SIGINT handler that exits 0 behind, and Ray Train's fit in the main thread installs one
    whose abort exits 1 without a word: a Ctrl-C in the training stage after ingest, stages one at a time, ends the
    run with 130 and says so; ingest stays finished, the training stage does not look finished."""
    storage = tmp_path / "s"
    run = unclip("run", QUICK, "--storage", storage, "--set", "stages=[synth, ingest, train_upsampler]", "--set", "synth.n=40",
                 "--set", "parallel_stages=1", "--set", "train_upsampler.steps=100000", cwd=tmp_path,
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and not (storage / "train_upsampler" / "ray_train").exists():  # in fit
        assert run.poll() is None, run.stdout.read()
        time.sleep(0.1)
    run.send_signal(signal.SIGINT)
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 130, output[-3000:]
    assert "interrupted. Finished stages are kept: the same command goes on from there." in output
    assert (storage / "ingest" / "_manifest.json").is_file() and not (storage / "train_upsampler" / "_manifest.json").exists()


def parallel_dag(monkeypatch, upsampler):
    """synth -> ingest -> {train_clip -> embed, train_upsampler}, each a fake task that records when it ran;
    train_clip waits for train_upsampler to start, which only parallel stages allow; embed runs alone."""
    from pipelines import dag
    from pipelines.dag import Stage

    upsampler_started = threading.Event()
    spans = {}

    def task(name, body=lambda: None):
        def run(cfg, ctx):
            start = time.monotonic()
            body()
            spans[name] = (start, time.monotonic(), mlflow.active_run().info.run_id)
            return {"ok": 1}
        return run

    def clip():
        assert upsampler_started.wait(60), "train_upsampler did not start while train_clip ran"

    def upsampler_body():
        upsampler_started.set()
        upsampler()

    for name, inputs, body in [("synth", (), None), ("ingest", ("synth",), None), ("train_clip", ("ingest",), clip),
                               ("embed", ("ingest", "train_clip"), None), ("train_upsampler", ("ingest",), upsampler_body)]:
        monkeypatch.setitem(dag.DAG, name, Stage(name, task(name, body or (lambda: None)), inputs=lambda cfg, i=inputs: i,
                                                 alone=name == "embed"))
    return spans


def parallel_config(tmp_path):
    from pipelines.config import PipelineConfig

    return PipelineConfig.model_validate({"storage": str(tmp_path), "parallel_stages": 2, "progress": False,
                                          "stages": ["synth", "ingest", "train_clip", "embed", "train_upsampler"]})


def test_parallel_stages_run_side_by_side_as_nested_mlflow_runs(tmp_path, monkeypatch):
    """parallel_stages: 2 starts train_upsampler beside train_clip (both need only ingest), each a child
    run of the pipeline's MLflow run; a stage starts only after its inputs finished, one that runs alone
    only after the others finished; results in plan order."""
    from pipelines.runner import run_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spans = parallel_dag(monkeypatch, upsampler=lambda: time.sleep(0.5))
    results = run_pipeline(parallel_config(tmp_path))
    assert list(results) == ["synth", "ingest", "train_clip", "embed", "train_upsampler"]
    assert {r["status"] for r in results.values()} == {"ran"}
    assert spans["ingest"][1] <= spans["train_clip"][0] and spans["ingest"][1] <= spans["train_upsampler"][0]
    assert spans["train_clip"][1] <= spans["embed"][0]
    assert spans["train_upsampler"][1] <= spans["embed"][0], "embed (alone) started beside train_upsampler"
    runs = mlflow_runs(tmp_path / "mlflow.db")
    parent = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert len(parent) == 1
    children = runs.set_index("run_id")
    for name, (_, _, run_id) in spans.items():
        assert children.loc[run_id, "tags.mlflow.parentRunId"] == parent["run_id"].iloc[0], name
        assert children.loc[run_id, "tags.unclip.stage"] == name
    # a second run finds every manifest and skips, in parallel as in sequence
    assert {r["status"] for r in run_pipeline(parallel_config(tmp_path)).values()} == {"skipped"}


def test_a_failed_parallel_stage_lets_the_running_one_finish_and_starts_nothing_new(tmp_path, monkeypatch):
    """train_upsampler fails while train_clip runs: train_clip finishes and keeps its manifest, embed (which
    needs it) does not start, and the run raises the upsampler's error."""
    from pipelines.runner import StageFailed, run_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def fail():
        raise RuntimeError("upsampler broke")

    spans = parallel_dag(monkeypatch, upsampler=fail)
    with pytest.raises(StageFailed, match="train_upsampler failed: RuntimeError: upsampler broke"):
        run_pipeline(parallel_config(tmp_path))
    assert "train_clip" in spans and "embed" not in spans
    assert (tmp_path / "train_clip" / "_manifest.json").is_file()
    assert not (tmp_path / "train_upsampler" / "_manifest.json").exists()


def test_ctrl_c_does_not_report_the_stages_it_ends_beside_it_as_failed(tmp_path, monkeypatch, capsys):
    """Ctrl-C while train_upsampler runs beside train_clip: the run is interrupted; the stage whose actors
    then die with the driver is not reported as a failed stage."""
    from pipelines.runner import run_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    driver_gone = threading.Event()

    def interrupted_then_its_actor_dies():
        os.kill(os.getpid(), signal.SIGINT)
        driver_gone.wait(30)
        raise RuntimeError("The actor is dead because its owner has died")

    parallel_dag(monkeypatch, upsampler=interrupted_then_its_actor_dies)
    # Python's own handler, as the CLI has it (an earlier test in this process may have left Ray Train's)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(parallel_config(tmp_path))
    finally:
        signal.signal(signal.SIGINT, before)
    driver_gone.set()
    for thread in threading.enumerate():
        if thread.name.startswith("stage-"):
            thread.join(30)
    assert "actor is dead" not in capsys.readouterr().err


def test_a_failed_stage_ends_the_command_with_its_error_in_one_line_and_keeps_the_traceback(tmp_path, monkeypatch):
    """`unclip run` prints a failed stage's own message and exits 1, without a traceback screen; the
    traceback is in the stage's directory and its MLflow run (FAILED); a rerun that succeeds removes it."""
    from typer.testing import CliRunner

    from pipelines.cli import RUN_AGAIN, app
    from tasks.training import TrainingFailed

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    reason = "training failed: the training split has fewer rows than batch_size=64 per worker (1 workers): lower batch_size"

    def fail():
        raise TrainingFailed(f"train_upsampler: {reason}")

    parallel_dag(monkeypatch, upsampler=fail)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(parallel_config(tmp_path / "run").model_dump(mode="json")))
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 1, result.output
    failure = tmp_path / "run" / "train_upsampler" / "failure.txt"
    assert result.stderr.splitlines()[-2:] == [f"error: train_upsampler failed: {reason} (traceback: {failure})", RUN_AGAIN]
    assert f"✗  train_upsampler failed: {reason}" in result.stderr and "Traceback" not in result.output
    assert "Traceback (most recent call last)" in failure.read_text() and f"TrainingFailed: train_upsampler: {reason}" in failure.read_text()
    runs = mlflow_runs(tmp_path / "run" / "mlflow.db").set_index("tags.mlflow.runName")
    assert runs.loc["train_upsampler", "status"] == "FAILED"
    logged = mlflow.artifacts.download_artifacts(run_id=runs.loc["train_upsampler", "run_id"], artifact_path="failure.txt",
                                                 tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    assert Path(logged).read_text() == failure.read_text()

    parallel_dag(monkeypatch, upsampler=lambda: None)
    assert CliRunner().invoke(app, ["run", str(config)]).exit_code == 0
    assert not failure.exists() and (failure.parent / "_manifest.json").is_file()
