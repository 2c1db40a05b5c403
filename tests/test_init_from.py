"""init_from: a registry URI (a real sqlite MLflow registry, the stack logged as tasks.register
logs it) or a run's storage directory gives the part its training stage trains; a URI that does
not resolve, or a stack without that part, is a clear error before and during the run."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import pytest
import torch

from models import checkpoint, sizes
from tasks import register, training
from tasks.stack import stack_parts
from tests.mlflow_helpers import use_sqlite_store
from tests.test_register import stack_storage  # noqa: F401  (fixture: embed/clip, pca/, train_*/ema)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def register_stack(storage: Path, uri: str, name: str, without: tuple[str, ...] = ()) -> str:
    """Log the stack of `storage` (less the parts `without`) as tasks.register does, register it
    as `name` with the alias `champion`; returns the version."""
    use_sqlite_store(Path(uri.removeprefix("sqlite:///")))
    parts = stack_parts(storage)
    for part in without:
        parts[part] = None
    with mlflow.start_run(), tempfile.TemporaryDirectory() as workdir:
        info = register.log_stack_model(parts, register.RegisterConfig(smoke_test=False), Path(workdir))
    version = str(mlflow.register_model(info.model_uri, name).version)
    mlflow.MlflowClient(uri).set_registered_model_alias(name, "champion", version)
    return version


@pytest.fixture(scope="module")
def registry(stack_storage, tmp_path_factory):  # noqa: F811
    """(tracking URI, version) of `unclip-full` (every part) and `unclip-no-upsampler`; afterwards
    the process-wide tracking URI points at another, empty store, so only an explicit client finds them."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry')}/mlflow.db"
    version = register_stack(stack_storage, uri, "unclip-full")
    register_stack(stack_storage, uri, "unclip-no-upsampler", without=("upsampler",))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path_factory.mktemp('elsewhere')}/mlflow.db")
    return uri, version


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("stage, part", [("train_decoder", "decoder"), ("train_upsampler", "upsampler")])
def test_registry_uri_gives_the_stages_part(stage, part, registry, stack_storage, tmp_path):  # noqa: F811
    uri, version = registry
    original = checkpoint.load(stack_storage / stage / "ema")
    for source in ("models:/unclip-full@champion", f"models:/unclip-full/{version}"):
        assert training.check_inputs(stage, training.TrainConfig(init_from=source), tmp_path, uri) == []
        resolved = training.resolve_init_from(source, tmp_path, stage, uri, download_to=tmp_path / "init_from")
        assert Path(resolved).is_relative_to(tmp_path / "init_from")
        fresh = sizes.build_from_config(part, checkpoint.read_config(resolved)[1])
        training.load_init_weights(fresh, resolved)  # what each training worker does
        _same_weights(fresh, original)


def test_storage_directory_gives_the_stages_part(stack_storage, tmp_path):  # noqa: F811
    resolved = training.resolve_init_from(str(stack_storage), tmp_path, "train_prior")
    assert Path(resolved) == stack_storage / "train_prior" / "ema"


def test_unresolvable_uri_and_missing_part_are_clear_errors(registry, tmp_path):
    uri, _ = registry
    bad = "models:/unclip-full@nosuchalias"
    with pytest.raises(training.TrainingFailed, match="init_from 'models:/unclip-full@nosuchalias': cannot fetch"):
        training.resolve_init_from(bad, tmp_path, "train_decoder", uri, download_to=tmp_path / "d")
    [problem] = training.check_inputs("train_decoder", training.TrainConfig(init_from=bad), tmp_path, uri)
    assert problem.startswith("train_decoder.init_from") and bad in problem and "check the name, alias" in problem

    missing = "models:/unclip-no-upsampler@champion"
    assert training.check_inputs("train_upsampler", training.TrainConfig(init_from=missing), tmp_path, uri) == []
    with pytest.raises(training.TrainingFailed, match=r"has no upsampler \(it has clip, prior, decoder, pca\); register"):
        training.resolve_init_from(missing, tmp_path, "train_upsampler", uri, download_to=tmp_path / "d")

    with pytest.raises(training.TrainingFailed, match="none of which train_clip trains"):
        training.resolve_init_from("models:/unclip-full@champion", tmp_path, "train_clip", uri, download_to=tmp_path / "d")


def test_preflight_names_the_uri_and_the_store(tmp_path, monkeypatch):
    """Before anything is written: a registry URI with no registry behind it exits 2 (ConfigError)."""
    from pipelines.checks import preflight
    from pipelines.config import ConfigError, validate

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store: sqlite under storage
    cfg = validate({"storage": str(tmp_path / "s"), "stages": ["train_decoder"],
                    "train_decoder": {"init_from": "models:/unclip@champion"}})
    with pytest.raises(ConfigError, match=r"train_decoder.init_from 'models:/unclip@champion': there is no model registry"):
        preflight(cfg, ["train_decoder"])
    assert not (tmp_path / "s").exists()
