"""register stage: the stack as one MLflow pyfunc model, gated promotion, and HTTP serving.

The stack is written once per session in the stages' own layout (embed/clip, train_*/ema, pca/)
with untrained tiny networks: registration, loading and serving do not depend on what the weights
learned, and training even a few steps through Ray Train costs minutes here.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
import torch
from PIL import Image

from tasks import register
from tasks.context import StageContext
from tasks.register import CHALLENGER, CHAMPION, DECISION_TAG, REASON_TAG, RegisterConfig, decide
from tests.mlflow_helpers import use_sqlite_store
from tests.model_helpers import perturb

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = {"prior_steps": 2, "decoder_steps": 2, "upsampler_steps": 2}
MANIFEST = {"fingerprint": "test", "counts": {}}


@pytest.fixture(scope="session")
def stack_storage(tmp_path_factory) -> Path:
    """A storage directory with embed/clip, pca/, train_{prior,decoder,upsampler}/ema."""
    import numpy as np

    from models import checkpoint, sizes
    from models.pca import fit_pca
    from tasks import train_decoder, train_prior
    from tasks.embed import EmbedConfig, resolve_clip_spec
    from tasks.schema import CLIP_DIR, CLIP_SPEC_NAME, save_pca

    storage = tmp_path_factory.mktemp("stack")
    embed = storage / "embed"
    spec = resolve_clip_spec(EmbedConfig(clip_arch="tiny", clip_pretrained=None), embed, storage, seed=0)
    (embed / CLIP_DIR / CLIP_SPEC_NAME).write_text(json.dumps(spec))
    torch.manual_seed(0)
    prior = sizes.build_from_config("prior", train_prior.model_config(train_prior.TrainPriorConfig(), embed))
    decoder = sizes.build_from_config("decoder", train_decoder.model_config(train_decoder.TrainDecoderConfig(), embed))
    upsampler = sizes.build("upsampler", "tiny", low_res_size=decoder.config.image_size,
                            image_size=2 * decoder.config.image_size)
    for stage, net in (("train_prior", prior), ("train_decoder", decoder), ("train_upsampler", upsampler)):
        checkpoint.save(perturb(net, scale=0.02), storage / stage / "ema")
    z = torch.nn.functional.normalize(torch.as_tensor(np.random.default_rng(0).normal(size=(64, prior.config.embed_dim)),
                                                      dtype=torch.float32), dim=-1)
    save_pca(fit_pca(z, 8, 4), storage / "pca")
    for stage in ("embed", "pca", "train_prior", "train_decoder", "train_upsampler"):
        (storage / stage / "_manifest.json").write_text(json.dumps(MANIFEST))
    return storage


def register_version(storage: Path, uri: str, metrics: dict | None, cfg: RegisterConfig, tag: str) -> tuple[dict, str]:
    """One register stage run, as the runner does it (an active run); metrics: what evaluate wrote."""
    inputs = {s: storage / s for s in ("embed", "pca", "train_prior", "train_decoder", "train_upsampler")}
    out = storage / f"register_{tag}"
    out.mkdir()
    if metrics is not None:
        (storage / f"evaluate_{tag}").mkdir()
        (storage / f"evaluate_{tag}" / "metrics.json").write_text(json.dumps(metrics))
        inputs["evaluate"] = storage / f"evaluate_{tag}"
    use_sqlite_store(Path(uri.removeprefix("sqlite:///")))
    with mlflow.start_run(run_name=f"register {tag}") as run:
        counts = register.run(cfg, StageContext("register", storage, out, inputs, show_progress=False))
    return counts, run.info.run_id


@pytest.fixture(scope="module")
def registry(stack_storage, tmp_path_factory):
    """Three versions by fd_clip (lower is better): 10 (first), 12 (worse), 8 (better)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry')}/mlflow.db"
    cfg = RegisterConfig(metric="fd_clip", direction="min", min_delta=0.5, sampling=FAST)
    runs = {}
    for tag, value, smoke in (("first", 10.0, True), ("worse", 12.0, False), ("better", 8.0, False)):
        counts, run_id = register_version(stack_storage, uri, {"fd_clip": value, "clip_score": 0.2},
                                          cfg.model_copy(update={"smoke_test": smoke}), tag)
        runs[tag] = (counts, run_id)
    yield uri, runs
    mlflow.set_tracking_uri(None)


def decode_png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_promotion_first_worse_better_with_reasons(registry):
    uri, runs = registry
    client = mlflow.MlflowClient(uri)
    assert [runs[t][0]["model_version"] for t in ("first", "worse", "better")] == [1.0, 2.0, 3.0]
    assert [runs[t][0]["promoted"] for t in ("first", "worse", "better")] == [1.0, 0.0, 1.0]
    v1, v2, v3 = (client.get_model_version("unclip", str(v)) for v in (1, 2, 3))
    assert [v.tags[DECISION_TAG] for v in (v1, v2, v3)] == [CHAMPION, CHALLENGER, CHAMPION]
    assert "first registered version" in v1.tags[REASON_TAG]
    assert "does not beat champion v1" in v2.tags[REASON_TAG] and "12" in v2.tags[REASON_TAG]
    assert "beats champion v1" in v3.tags[REASON_TAG] and "does not" not in v3.tags[REASON_TAG]
    assert v3.tags["unclip.previous_champion"] == "1" and float(v3.tags["unclip.metric.fd_clip"]) == 8.0
    # aliases: champion moved 1 -> 3 (never to 2); challenger is always the newest version
    assert str(client.get_model_version_by_alias("unclip", CHAMPION).version) == "3"
    assert str(client.get_model_version_by_alias("unclip", CHALLENGER).version) == "3"
    # the stage's run carries the decision too
    run = client.get_run(runs["worse"][1])
    assert run.data.tags[DECISION_TAG] == CHALLENGER and run.data.tags[REASON_TAG] == v2.tags[REASON_TAG]
    assert run.data.tags["unclip.model_version"] == "2"


def test_decide_rule():
    lower = RegisterConfig(metric="fd_clip", direction="min", min_delta=1.0)
    higher = RegisterConfig(metric="clip_score", direction="max", min_delta=0.0)
    assert decide(5.0, None, None, lower).promote  # no champion
    assert not decide(9.5, "1", 10.0, lower).promote  # better, but not by more than min_delta
    assert decide(8.9, "1", 10.0, lower).promote
    assert not decide(0.3, "1", 0.3, higher).promote  # a tie does not beat
    assert decide(0.31, "1", 0.3, higher).promote
    assert not decide(None, "1", 0.3, higher).promote  # no evaluate metrics: cannot compare
    assert not decide(float("nan"), "1", 0.3, higher).promote
    assert decide(0.1, "1", None, higher).promote  # the champion was never measured


def test_missing_metric_fails_before_registering(registry, stack_storage):
    uri, _ = registry
    cfg = RegisterConfig(model_name="never", metric="fid")
    with pytest.raises(ValueError, match=r"register.metric='fid' .*\['clip_score'\]"):
        register_version(stack_storage, uri, {"clip_score": 0.2}, cfg, "badmetric")
    assert "never" not in [m.name for m in mlflow.MlflowClient(uri).search_registered_models()]


def test_pyfunc_champion_returns_pngs(registry):
    uri, _ = registry
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/unclip@{CHAMPION}")
    request = pd.DataFrame({"prompt": ["a small red circle", "a blue square"], "seed": [1, 1], **{k: [v, v] for k, v in FAST.items()}})
    out = model.predict(request)
    assert list(out.columns) == ["image"] and len(out) == 2
    images = [decode_png(b) for b in out["image"]]
    stack = model.unwrap_python_model().stack
    assert all(im.size == (stack.image_size, stack.image_size) and im.mode == "RGB" for im in images)
    assert len(stack.unclip.upsamplers) == 1 and stack.pca is not None
    # a seeded row's image depends on its prompt, seed and settings only, not on the other rows
    again = model.predict(pd.DataFrame({"prompt": ["a blue square"], "seed": [1], **{k: [v] for k, v in FAST.items()}}))
    assert _same_pixels(again["image"][0], out["image"][1])
    assert not _same_pixels(model.predict(request.assign(seed=[1, 2]))["image"][1], out["image"][1])
    assert not _same_pixels(model.predict(request.assign(decoder_eta=[1.0, 1.0]))["image"][1], out["image"][1])  # ancestral


def _same_pixels(a: str, b: str) -> bool:
    import numpy as np

    return np.abs(np.asarray(decode_png(a), int) - np.asarray(decode_png(b), int)).max() <= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_champion_over_http(registry, tmp_path):
    uri, _ = registry
    port = _free_port()
    # the server execs `uvicorn` from PATH: the venv's bin directory must be on it (an activated venv)
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen([str(Path(venv_bin) / "mlflow"), "models", "serve", "-m", f"models:/unclip@{CHAMPION}", "-p", str(port),
                               "--env-manager", "local", "--host", "127.0.0.1"],
                              env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"server exited: {(tmp_path / 'serve.log').read_text()[-3000:]}"
            try:
                if requests.get(f"{base}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"no /ping in 180 s: {(tmp_path / 'serve.log').read_text()[-3000:]}"
            time.sleep(1)

        records = [{"prompt": "a small red circle", "seed": 0, **FAST}, {"prompt": "a blue square", **FAST}]
        reply = requests.post(f"{base}/invocations", json={"dataframe_records": records}, timeout=120)
        assert reply.status_code == 200, reply.text
        images = [decode_png(row["image"]) for row in reply.json()["predictions"]]
        assert len(images) == 2 and all(im.format == "PNG" and im.size[0] > 0 for im in images)

        bad = {
            "no prompt column": json.dumps({"dataframe_records": [{"seed": 0}]}),
            "not JSON": "{this is not json",
            "bad steps": json.dumps({"dataframe_records": [{"prompt": "a", "decoder_steps": 0}]}),
            "fractional seed": json.dumps({"dataframe_records": [{"prompt": "a", "seed": 1.5}]}),
        }
        for what, body in bad.items():
            reply = requests.post(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=60)
            assert 400 <= reply.status_code < 500, (what, reply.status_code, reply.text)
            assert reply.json().get("message"), (what, reply.text)
        assert "prompt" in requests.post(f"{base}/invocations", data=bad["no prompt column"],
                                         headers={"Content-Type": "application/json"}, timeout=60).json()["message"]
        assert requests.get(f"{base}/ping", timeout=5).status_code == 200  # still up after bad requests
    finally:
        stop(server)
        log.close()


def stop(server: subprocess.Popen) -> None:
    """End the server's process group (mlflow execs uvicorn, which may start workers)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, None)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    server.wait()


def test_runner_registers_as_last_stage(registry, stack_storage, tmp_path, monkeypatch):
    """The runner wires register after the training stages; its inputs follow `stages`."""
    from pipelines.config import validate
    from pipelines.dag import plan
    from pipelines.runner import run_pipeline

    storage = tmp_path / "run"
    storage.mkdir()
    for stage in ("embed", "pca", "train_prior", "train_decoder"):
        os.symlink(stack_storage / stage, storage / stage)
    uri, _ = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the registry's database: a fresh one costs ~10 s
    stages = ["synth", "ingest", "embed", "pca", "train_prior", "train_decoder", "register"]
    cfg = validate({"storage": str(storage), "stages": stages, "progress": False,
                    "register": {"model_name": "unclip-runner", "sampling": FAST, "smoke_test": False}})
    assert plan(cfg)[-1].name == "register"
    assert plan(cfg)[-1].inputs(cfg) == ("embed", "train_prior", "train_decoder", "pca")  # no upsampler stage here
    results = run_pipeline(cfg, only=["register"])
    assert results["register"]["counts"] == {"model_version": 1.0, "promoted": 1.0}
    written = json.loads((storage / "register" / "registered.json").read_text())
    assert written["decision"] == CHAMPION and written["version"] == "1" and written["name"] == "unclip-runner"
    version = mlflow.MlflowClient(uri).get_model_version_by_alias("unclip-runner", CHAMPION)
    local = mlflow.artifacts.download_artifacts(f"models:/unclip-runner/{version.version}", tracking_uri=uri)
    assert sorted(p.name for p in (Path(local) / "artifacts").iterdir()) == ["clip", "decoder", "pca", "prior"]
    assert sorted(p.name for p in (Path(local) / "code").iterdir()) == ["models", "tasks"]
    mlflow.set_tracking_uri(None)


def test_exported_clip_dir_loads_without_its_source(stack_storage, tmp_path):
    """A CLIP whose weights live outside the embed directory (a local file) is bundled into the
    model's clip artifact: it loads after the source file is gone and encodes the same."""
    import shutil

    from tasks.schema import CLIP_SPEC_NAME, CLIP_WEIGHTS_NAME, export_clip_dir, load_clip_dir

    source = stack_storage / "embed" / "clip"
    external = tmp_path / "weights" / "my_clip.safetensors"
    external.parent.mkdir()
    shutil.copyfile(source / CLIP_WEIGHTS_NAME, external)
    spec = json.loads((source / CLIP_SPEC_NAME).read_text())
    spec.pop("random_init_seed")
    spec["pretrained"] = str(external)
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / CLIP_SPEC_NAME).write_text(json.dumps(spec))

    exported = export_clip_dir(tmp_path / "clip", tmp_path / "exported")
    external.unlink()
    tokens = ["a small red circle", "a blue square"]
    original = load_clip_dir(source).eval()
    bundled = load_clip_dir(exported).eval()
    with torch.no_grad():
        torch.testing.assert_close(bundled.encode_text(bundled.tokenize(tokens)), original.encode_text(original.tokenize(tokens)))


def test_stack_parts_of_a_storage(stack_storage, tmp_path):
    from tasks.stack import StackError, stack_parts

    parts = stack_parts(stack_storage)
    assert parts["clip"] == stack_storage / "embed" / "clip" and parts["upsampler"] == stack_storage / "train_upsampler" / "ema"
    (tmp_path / "embed").symlink_to(stack_storage / "embed")
    (tmp_path / "train_prior").symlink_to(stack_storage / "train_prior")
    with pytest.raises(StackError, match=r"no trained decoder \(.*train_decoder/ema\)"):
        stack_parts(tmp_path)
