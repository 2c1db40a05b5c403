"""The size registry: every kind has every named size, and a tiny model of each kind
round-trips through a checkpoint."""

import pytest
import torch

from models import checkpoint
from models.sizes import MODELS, build, config_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_kind_has_the_named_sizes(kind):
    assert {"tiny", "small", "base", "paper"} <= set(MODELS[kind][1])


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_tiny_models_are_small_and_reload_bit_identical(kind, tmp_path):
    torch.manual_seed(0)
    model = build(kind, "tiny")
    assert sum(p.numel() for p in model.parameters()) < 2_000_000  # "runs on a CPU in seconds"
    checkpoint.save(model, tmp_path)
    loaded = checkpoint.load(tmp_path)
    assert type(loaded) is type(model) and loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="known: \\['ar_prior', 'decoder', 'prior', 'upsampler'\\]"):
        config_for("vae", "tiny")
    with pytest.raises(ValueError, match="unknown decoder size 'huge'"):
        config_for("decoder", "huge")
