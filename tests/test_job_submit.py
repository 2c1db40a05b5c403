"""`ray job submit` as the README writes it, against a real local head started by `make ray-head`.

The head gets its own temp dir and ports on 127.0.0.1 (other Ray instances run on this machine)
and is stopped by killing its process session, never with `ray stop`, which stops every Ray of
this user. The venv's bin is removed from PATH first: the README's commands must work without an
activated venv. The pipeline jobs run the quick preset's data half (synth, ingest, embed, pca:
the stages that exercise Ray and MLflow, in a few minutes on 2 cores), and, on object-store
storage that the worker node keeps its own copy of, one short training stage (its workers log to
MLflow from that node).

A second Ray node joins the head, so the jobs run on a two-node cluster laid out as KubeRay's: the
head runs no tasks (`--num-cpus 0`), the worker node has the CPUs. The node runs in its own mount
namespace with an empty tmpfs over one folder (BLIND below): a node without the shared filesystem
for that folder only, as a cluster node that lacks the storage volume (needs `unshare`, i.e. root).
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

from tests.test_object_storage import s3_server  # noqa: F401  (fixture)
from tests.test_register import stop
from tests.test_runner import DATA_HALF, data_half

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


def stop_session(sid: int, grace_s: float = 5) -> None:
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
def cluster():
    """`make ray-head` (README), with this test's temp dir and ports, and a second node; yields the
    dashboard address and the second node's process id."""
    temp_dir = tempfile.mkdtemp(prefix="unclip-ray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    dashboard = free_port()
    ports = {
        "--port": free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(), "--object-manager-port": free_port(),
    }
    extra = " ".join(f"{flag} {port}" for flag, port in ports.items())
    extra += f" --num-cpus 0 --block --temp-dir {temp_dir} --object-store-memory {256 * 2**20} --disable-usage-stats"
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
        # its own temp dir, as on another machine: its runtime-env agent unpacks the working dir there too
        node_temp_dir = tempfile.mkdtemp(prefix="unclip-ray2-", dir="/tmp")
        node = start_second_node(address, ports["--port"], node_temp_dir)
        try:
            yield address, node.pid
        finally:
            stop_session(node.pid)
            node.wait(timeout=30)
            shutil.rmtree(node_temp_dir, ignore_errors=True)
            shutil.rmtree(BLIND, ignore_errors=True)
    finally:
        stop_session(proc.pid)
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head(cluster):
    return cluster[0]


BLIND = Path(tempfile.gettempdir()) / "unclip-not-on-node-2"


def can_hide_a_folder() -> bool:
    """Whether a process here may get its own mounts (root, or CAP_SYS_ADMIN) to hide a folder with."""
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "sh", "-c", 'mount -t tmpfs tmpfs "$0"', tempfile.gettempdir()], capture_output=True).returncode == 0


HIDES_A_FOLDER = can_hide_a_folder()


def start_second_node(address: str, head_port: int, temp_dir: str) -> subprocess.Popen:
    """A 2-CPU worker node on this machine joined to the head (tests/ray_node.py); BLIND is an empty
    folder on it when it can have its own mounts."""
    start = f"exec {sys.executable} {REPO / 'tests' / 'ray_node.py'} 127.0.0.1:{head_port} {temp_dir} 2"
    BLIND.mkdir(exist_ok=True)
    command = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {BLIND} && {start}"] if HIDES_A_FOLDER else ["sh", "-c", start]
    with open(Path(temp_dir) / "node2.log", "w") as log:  # the node writes to its own copy of the descriptor
        node = subprocess.Popen(command, cwd=REPO, env=user_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(alive_nodes(address)) < 2:
        if node.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the second Ray node did not join:\n{(Path(temp_dir) / 'node2.log').read_text()}")
        time.sleep(1)
    return node


def alive_nodes(address: str) -> list[dict]:
    """The cluster's live nodes, from the dashboard's state API."""
    with urllib.request.urlopen(f"{address}/api/v0/nodes", timeout=10) as response:
        nodes = json.load(response)["data"]["result"]["result"]
    return [n for n in nodes if n["state"] == "ALIVE"]


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
    assert len(alive_nodes(head)) == 2  # it ran on two nodes, and checked that both see its storage

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
    logs = job_logs(head, "unclip-probe")
    line = next(line for line in logs.splitlines() if line.startswith("UNCLIP_PROBE "))
    paths = json.loads(line.removeprefix("UNCLIP_PROBE "))
    uploaded = Path(paths["cwd"]) / "pipelines" / "__init__.py"
    assert "working_dir_files" in paths["cwd"] and Path(paths["cwd"]) != REPO
    assert Path(paths["driver"]) == uploaded
    # one worker on each of the two nodes, each importing the copy its node unpacked
    workers = [Path(p) for p in paths["workers"]]
    assert len(workers) == 2 and uploaded in workers
    assert all(w.parts[-4:] == uploaded.parts[-4:] and "working_dir_files" in w.parts for w in workers)
    for node in alive_nodes(head):  # the second node's worker output reaches the job's logs too
        assert f"UNCLIP_WORKER_ON {node['node_id']}" in logs


@pytest.mark.skipif(not HIDES_A_FOLDER, reason="needs `unshare -m` (root) for a node without the folder")
def test_a_job_whose_storage_one_node_cannot_see_fails_naming_that_node(head, tmp_path):
    """A stage's workers run on any node: a run stops before any stage when one node lacks its storage."""
    storage = BLIND / f"u3-{tmp_path.name}"
    submitted = ray_job("submit", "--address", head, "--working-dir", ".", "--submission-id", "unclip-blind", "--",
                        "unclip", "run", "pipelines/configs/quick.yaml", "--storage", storage, *DATA_HALF)
    assert submitted.returncode != 0
    assert job_status(head, "unclip-blind") == "FAILED"
    logs = job_logs(head, "unclip-blind")
    node = next(n for n in alive_nodes(head) if not n["is_head_node"])
    assert f"error: storage {storage} is not visible from 1 of the cluster's 2 Ray nodes (127.0.0.1 ({node['node_id'][:8]}))" in logs
    assert "with --storage" in logs and "Traceback" not in logs
    assert not (storage / "synth").exists() and list((storage / "_pipeline").iterdir()) == []  # the check left no marker


@pytest.fixture()
def tracking_server(tmp_path):
    """`mlflow server` on 127.0.0.1 (sqlite backend, artifacts proxied to a local folder); yields its URI."""
    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    server = subprocess.Popen([str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'tracking.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts")],
                              env=user_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=5)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "mlflow-server.log").read_text()[-3000:]
                time.sleep(1)
        yield uri
    finally:
        stop(server)
        log.close()


@pytest.mark.skipif(not HIDES_A_FOLDER, reason="needs `unshare -m` (root) for a node without the folder")
def test_a_job_on_object_store_storage_runs_on_a_node_that_keeps_its_own_mirror(cluster, s3_server, tracking_server, tmp_path):
    """No shared volume: the driver's mirror of the store is in the folder the worker node does not
    see, and every task runs on that node (the head has no CPUs). The node keeps its own copy,
    pulled from the store; output comes back through the store; training logs to a tracking server."""
    from mlflow.tracking import MlflowClient
    from pyarrow import fs as pafs

    address, node_pid = cluster
    s3 = pafs.S3FileSystem(endpoint_override=s3_server, scheme="http", access_key="testing", secret_key="testing",
                           region="us-east-1", allow_bucket_creation=True)
    bucket = f"b{tmp_path.name[-8:].lower().replace('_', '')}"
    s3.create_dir(bucket)
    mirror = BLIND / f"mirror-{tmp_path.name}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": s3_server, "UNCLIP_LOCAL_MIRROR": str(mirror), "MLFLOW_TRACKING_URI": tracking_server}
    submitted = ray_job("submit", "--address", address, "--working-dir", ".", "--submission-id", "unclip-own-mirrors",
                        "--runtime-env-json", json.dumps({"env_vars": env}), "--",
                        "unclip", "run", "pipelines/configs/quick.yaml", "--storage", f"s3://{bucket}/run",
                        *data_half("train_prior"), "--set", "synth.n=120", "--set", "ingest.shard_size=50",
                        "--set", "train_prior.steps=40", "--set", "train_prior.log_every=10",
                        "--set", "train_prior.checkpoint_every=20", "--set", "train_prior.warmup_steps=5")
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    assert job_status(address, "unclip-own-mirrors") == "SUCCEEDED"
    logs = job_logs(address, "unclip-own-mirrors")
    node = next(n for n in alive_nodes(address) if not n["is_head_node"])
    assert f"1 Ray node(s) do not see {mirror} (127.0.0.1 ({node['node_id'][:8]})): each keeps its own copy" in logs

    for stage in ("synth", "ingest", "embed", "pca", "train_prior"):
        assert s3.get_file_info(f"{bucket}/run/{stage}/_manifest.json").is_file, stage
    # The node's view of the same path (through its process's root): its own copy, with the inputs of
    # the stages whose workers it ran (embed reads ingest's shards; train_prior reads embed's table),
    # and nothing for those that run on the driver's node (ingest downloads there: synth is not pulled).
    node_copy = Path(f"/proc/{node_pid}/root") / mirror.relative_to("/")
    assert (node_copy / "ingest" / "_manifest.json").read_text() == (mirror / "ingest" / "_manifest.json").read_text()
    assert (node_copy / "embed" / "_manifest.json").is_file() and list((node_copy / "embed" / "clip").iterdir())
    assert (mirror / "synth" / "_manifest.json").is_file() and not (node_copy / "synth").exists()
    assert not (node_copy / "train_prior").exists()  # its output went to the store, through the driver

    client = MlflowClient(tracking_server)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    prior = next(r for r in runs if r.data.tags.get("mlflow.runName") == "train_prior")
    assert prior.info.status == "FINISHED"
    assert len(client.get_metric_history(prior.info.run_id, "loss")) >= 2  # logged by the worker, on the node
