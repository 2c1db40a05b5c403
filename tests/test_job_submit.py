"""`ray job submit` as the README writes it, against a real local head started by `make ray-head`.

The head gets its own temp dir and ports on 127.0.0.1 (other Ray instances run on this machine)
and is stopped by killing its process session, never with `ray stop`, which stops every Ray of
this user. The venv's bin is removed from PATH first: the README's commands must work without an
activated venv. The pipeline job runs the quick preset's data half (synth, ingest, embed, pca:
the stages that exercise Ray and MLflow, in a few minutes on 2 cores; training adds nothing new
to how a job runs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_runner import DATA_HALF

pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Live processes of the session the head was started in (Ray's workers set their own
    process group, not their own session)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # after "pid (comm)": state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def stop_session(sid: int, grace_s: float = 20) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.5)


def user_env() -> dict[str, str]:
    """A shell with the venv not activated and no cluster or tracking address set."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != VENV_BIN)
    return env


@pytest.fixture(scope="module")
def head():
    """`make ray-head` (README), with this test's temp dir and ports; yields the dashboard address."""
    temp_dir = tempfile.mkdtemp(prefix="unclip-ray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    dashboard = free_port()
    ports = {
        "--port": free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(), "--object-manager-port": free_port(),
    }
    extra = " ".join(f"{flag} {port}" for flag, port in ports.items())
    extra += f" --block --temp-dir {temp_dir} --object-store-memory {256 * 2**20} --disable-usage-stats"
    log = open(Path(temp_dir) / "head.log", "w")
    # -o install: the venv exists (this test runs in it); do not let make reinstall it
    proc = subprocess.Popen(["make", "-o", "install", "ray-head", f"VENV={VENV_BIN.parent}", f"RAY_HEAD_ARGS={extra}"],
                            cwd=REPO, env=user_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"make ray-head exited {proc.returncode}:\n{(Path(temp_dir) / 'head.log').read_text()}")
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no Ray dashboard at {address} after 240 s:\n{(Path(temp_dir) / 'head.log').read_text()}")
                time.sleep(2)
        yield address
    finally:
        stop_session(proc.pid)
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_job(*args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY), "job", *map(str, args)], cwd=REPO, env=user_env(), capture_output=True, text=True, timeout=timeout)


def job_status(address: str, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(address).get_job_status(job_id).value)


def job_logs(address: str, job_id: str) -> str:
    result = ray_job("logs", "--address", address, job_id, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_pipeline_job_succeeds_with_outputs_mlflow_runs_and_readable_progress(head, tmp_path):
    from mlflow.tracking import MlflowClient

    storage = tmp_path / "u1"
    submitted = ray_job("submit", "--address", head, "--working-dir", ".", "--submission-id", "unclip-quick-ok", "--",
                        "unclip", "run", "pipelines/configs/quick.yaml", "--storage", storage, *DATA_HALF, "--set", "synth.n=120",
                        "--set", "ingest.shard_size=50",
                        "--set", "progress=true")
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    assert job_status(head, "unclip-quick-ok") == "SUCCEEDED"

    for stage in ("synth", "ingest", "embed", "pca"):
        assert (storage / stage / "_manifest.json").is_file()
    assert json.loads((storage / "embed" / "_manifest.json").read_text())["counts"]["rows"] > 0
    assert list((storage / "pca").glob("*.safetensors"))

    client = MlflowClient(tracking_uri=f"sqlite:///{storage}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parents] == ["FINISHED"]
    children = {r.data.tags["mlflow.runName"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert sorted(children) == ["embed", "ingest", "pca", "synth"]
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert children["ingest"].data.metrics["success"] > 0

    logs = job_logs(head, "unclip-quick-ok")
    assert "\r" not in logs and "█" not in logs  # no redraws, no bar glyphs
    assert any(line.startswith("synth 120/120 (100%)") for line in logs.splitlines())
    assert any(line.startswith("embed: shards 3/3 (100%)") for line in logs.splitlines())
    # a stage's summary stays on one line (rich would wrap it at 80 columns)
    assert any(line.startswith("✓  ingest in") and "shards=" in line for line in logs.splitlines()), logs[-4000:]
    assert f"done (MLflow run {parents[0].info.run_id})" in logs


def test_broken_config_job_fails_with_the_config_error_in_its_logs(head, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"name: broken\nstorage: {tmp_path / 'u2'}\ningest:\n  image_size: 3\n")
    submitted = ray_job("submit", "--address", head, "--working-dir", ".", "--submission-id", "unclip-broken", "--",
                        "unclip", "run", broken)
    assert submitted.returncode != 0
    assert job_status(head, "unclip-broken") == "FAILED"
    logs = job_logs(head, "unclip-broken")
    assert "error:" in logs and "ingest.image_size" in logs and "(got 3)" in logs
    assert "Traceback" not in logs
    assert not (tmp_path / "u2").exists()  # nothing written before the config was checked


def test_job_driver_and_workers_import_the_uploaded_working_dir(head):
    """The package is installed (editable) and also uploaded with --working-dir: Ray puts the
    uploaded copy first on PYTHONPATH of the driver and of every worker, so both run it."""
    submitted = ray_job("submit", "--address", head, "--working-dir", ".", "--submission-id", "unclip-probe", "--",
                        "python", "tests/job_probe.py")
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    line = next(line for line in job_logs(head, "unclip-probe").splitlines() if line.startswith("UNCLIP_PROBE "))
    paths = json.loads(line.removeprefix("UNCLIP_PROBE "))
    uploaded = Path(paths["cwd"]) / "pipelines" / "__init__.py"
    assert "working_dir_files" in paths["cwd"] and Path(paths["cwd"]) != REPO
    assert Path(paths["driver"]) == uploaded and Path(paths["worker"]) == uploaded
