"""Config validation: bad values fail before any work with exit code 2 and the key named."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import ConfigError, PipelineConfig, load_config
from pipelines.dag import plan

CONFIGS = Path(__file__).parents[1] / "pipelines" / "configs"


@pytest.mark.parametrize("name", ["demo", "quick", "laion"])
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.stages and plan(cfg)


def test_override_sets_typed_value():
    cfg = load_config(CONFIGS / "quick.yaml", ["ingest.processes=1", "synth.n=7", "ingest.additional_columns=[a, b]"])
    assert cfg.ingest.processes == 1 and cfg.synth.n == 7 and cfg.ingest.additional_columns == ["a", "b"]


def test_registered_model_samples_at_the_evaluated_guidance_and_eta_unless_set():
    assert load_config(CONFIGS / "quick.yaml", ["evaluate.decoder_guidance=1.5"]).register.sampling.decoder_guidance == 1.5
    cfg = load_config(CONFIGS / "quick.yaml", ["evaluate.decoder_guidance=1.5", "register.sampling.decoder_guidance=6"])
    assert cfg.register.sampling.decoder_guidance == 6
    assert load_config(CONFIGS / "quick.yaml", ["evaluate.decoder_eta=1"]).register.sampling.decoder_eta == 1
    cfg = load_config(CONFIGS / "quick.yaml", ["evaluate.decoder_eta=1", "register.sampling.decoder_eta=0.5"])
    assert cfg.register.sampling.decoder_eta == 0.5
    # `unclip vary` decodes at the guidance evaluate's variations were measured at
    assert load_config(CONFIGS / "quick.yaml", ["evaluate.decoder_guidance=1.5"]).register.sampling.variation_guidance == 1.5
    cfg = load_config(CONFIGS / "quick.yaml", ["evaluate.decoder_guidance=1.5", "evaluate.variation_guidance=3"])
    assert cfg.register.sampling.variation_guidance == 3 and cfg.register.sampling.decoder_guidance == 1.5


@pytest.mark.parametrize(
    "override, key, hint",
    [
        ("ingest.processes=two", "ingest.processes", "valid integer"),
        ("ingest.max_failure_rate=1.5", "ingest.max_failure_rate", "less than or equal to 1"),
        ("synth.n=0", "synth.n", "greater than or equal to 1"),
        ("ingest.bogus=1", "ingest.bogus", "allowed here: additional_columns"),
        ("stages=[synth, train_magic]", "stages.1", "'train_decoder', 'train_upsampler'"),
        ("ingest.distributor=spark", "ingest.distributor", "'auto', 'multiprocessing' or 'ray'"),
    ],
)
def test_bad_values_name_the_key(override, key, hint):
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / "quick.yaml", [override])
    assert key in str(error.value) and hint in str(error.value)


def test_stage_whose_input_is_not_configured_is_rejected():
    cfg = PipelineConfig.model_validate({"stages": ["ingest"]})  # no url_list and no synth stage
    with pytest.raises(ConfigError, match="needs the output of 'synth'"):
        plan(cfg)


def test_unknown_until_stage_is_rejected():
    with pytest.raises(ConfigError, match="not in this config's stages"):
        plan(load_config(CONFIGS / "quick.yaml"), until="train_upsampler2")


def test_cli_exits_2_and_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage: out\ningest:\n  threads: -3\n")
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "ingest.threads" in result.stderr and "-3" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing started


def test_cli_rejects_malformed_yaml_and_set(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage: [unclosed\n")
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "validate", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2 and "not valid YAML" in result.stderr
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "validate", str(CONFIGS / "quick.yaml"), "--set", "novalue"], capture_output=True, text=True)
    assert result.returncode == 2 and "KEY=VALUE" in result.stderr
