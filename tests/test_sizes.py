"""The size registry: every kind has every named size, and a tiny model of each kind
round-trips through a checkpoint."""

import pytest
import torch

from models import checkpoint, sizes
from models.sizes import KINDS, build, config_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_has_the_named_sizes(kind):
    assert {"tiny", "small", "base", "paper"} <= set(KINDS[kind].sizes)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_tiny_models_are_small_and_reload_bit_identical(kind, tmp_path):
    torch.manual_seed(0)
    model = build(kind, "tiny")
    # "runs on a CPU in seconds"; CLIP's 49408-token embedding table alone is 3.2M at width 64
    limit = 4_000_000 if kind == "clip" else 2_000_000
    assert sum(p.numel() for p in model.parameters()) < limit
    checkpoint.save(model, tmp_path)
    loaded = checkpoint.load(tmp_path)
    assert type(loaded) is type(model) and loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_overrides_and_unknown_names_are_clear_errors():
    assert build("prior", "tiny", num_layers=1).config.num_layers == 1
    with pytest.raises(ValueError, match="known: \\['ar_prior', 'clip', 'decoder', 'prior', 'upsampler'\\]"):
        config_for("vae", "tiny")
    with pytest.raises(ValueError, match="unknown decoder size 'huge'"):
        config_for("decoder", "huge")
    with pytest.raises(TypeError, match="num_bucket"):  # a misspelt field is named
        config_for("ar_prior", "tiny", num_bucket=3)


@pytest.mark.parametrize("kind", ["prior", "decoder", "upsampler"])
def test_schedulers_one_way_for_every_diffusion_kind(kind):
    torch.manual_seed(0)
    model = build(kind, "tiny")
    training, sampling = sizes.schedulers(model, "ddim")
    assert type(training).__name__ == "DDPMScheduler" and type(sampling).__name__ == "DDIMScheduler"
    assert training is model.training_scheduler and sampling is not model.scheduler("ddim")  # fresh: diffusers' are stateful
    torch.testing.assert_close(training.alphas_cumprod, sampling.alphas_cumprod)
    with pytest.raises(TypeError, match="no schedulers"):
        sizes.schedulers(build("ar_prior", "tiny"))
