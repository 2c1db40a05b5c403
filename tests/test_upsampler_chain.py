"""A second upsampler stage (train_upsampler2): a tiny 16→32→64 stack trains both upsamplers on
real Ray Train, and the stack (tasks.stack, which evaluate, register and the sampling CLI load)
samples through both in order; the pipeline's config, plan and preflight know the stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models import checkpoint, sizes
from pipelines.config import ConfigError, validate
from tasks import train_upsampler
from tests.model_helpers import perturb
from tests.shards import write_shards
from tests.train_helpers import Inputs, run_stage

MANIFEST = {"fingerprint": "test", "counts": {}}
FAST = dict(steps=3, batch_size=4, workers=1, warmup_steps=0, checkpoint_every=3, log_every=3, val_fraction=0.0,
            cpus_per_worker=0.5)
SMALL = {"block_out_channels": [8, 16], "norm_num_groups": 8, "layers_per_block": 1}


def write_base_stack(storage: Path, decoder_size: int) -> None:
    """embed/clip (tiny, random), train_prior/ema and train_decoder/ema (decoder_size px), untrained."""
    from tasks import train_decoder, train_prior
    from tasks.embed import EmbedConfig, resolve_clip_spec
    from tasks.schema import CLIP_DIR, CLIP_SPEC_NAME

    embed = storage / "embed"
    spec = resolve_clip_spec(EmbedConfig(clip_arch="tiny", clip_pretrained=None), embed, storage, seed=0)
    (embed / CLIP_DIR / CLIP_SPEC_NAME).write_text(json.dumps(spec))
    torch.manual_seed(0)
    prior = sizes.build_from_config("prior", train_prior.model_config(train_prior.TrainPriorConfig(), embed))
    decoder_cfg = train_decoder.TrainDecoderConfig(model={"image_size": decoder_size})
    decoder = sizes.build_from_config("decoder", train_decoder.model_config(decoder_cfg, embed))
    for stage, net in (("train_prior", prior), ("train_decoder", decoder)):
        checkpoint.save(perturb(net, scale=0.02), storage / stage / "ema")
    for stage in ("embed", "train_prior", "train_decoder"):
        (storage / stage / "_manifest.json").write_text(json.dumps(MANIFEST))


def test_two_upsamplers_train_and_the_stack_samples_through_both(ray_local, tmp_path):
    from models.unclip import Stage
    from tasks.stack import load_stack

    ingest = tmp_path / "ingest"
    write_shards(ingest, range(1), 16, size=64)
    inputs = Inputs(tmp_path, ingest, embed=None)
    first = train_upsampler.TrainUpsamplerConfig(model={"image_size": 32, "low_res_size": 16, **SMALL}, **FAST)
    second = train_upsampler.TrainUpsampler2Config(model={"image_size": 64, "low_res_size": 32, **SMALL}, **FAST)
    for name, cfg in (("train_upsampler", first), ("train_upsampler2", second)):
        counts, _, _ = run_stage(train_upsampler, cfg, inputs, tmp_path, name)
        assert counts["steps"] == 3 and counts["skipped_steps"] == 0
    up1, up2 = (checkpoint.load(tmp_path / s / "ema") for s in ("train_upsampler", "train_upsampler2"))
    assert (up1.config.low_res_size, up1.config.image_size, up2.config.low_res_size, up2.config.image_size) == (16, 32, 32, 64)
    # the paper's second upsampler: linear schedule, BSR conditioning (the first keeps the size's)
    assert (up2.config.schedule, up2.config.degradation) == ("linear", "bsr")
    assert (up1.config.schedule, up1.config.degradation) == ("cosine", "blur")

    write_base_stack(tmp_path, decoder_size=16)
    stack = load_stack(tmp_path)
    assert [u.config.image_size for u in stack.unclip.upsamplers] == [32, 64] and stack.image_size == 64
    calls = []
    hooks = [u.unet.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, u in enumerate(stack.unclip.upsamplers)]
    images = stack.unclip.sample(["a small red circle"], generator=torch.Generator().manual_seed(0),
                                 prior={"steps": 2}, decoder=Stage(steps=2), upsamplers=[Stage(steps=2)] * 2)
    for hook in hooks:
        hook.remove()
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    assert calls == [0, 0, 1, 1]  # the first upsampler's two steps, then the second's


def test_config_plan_and_preflight_know_the_second_upsampler(tmp_path):
    from pipelines.checks import preflight
    from pipelines.dag import DAG, plan, register_inputs

    stages = ["synth", "ingest", "embed", "train_prior", "train_decoder", "train_upsampler", "train_upsampler2",
              "evaluate", "register"]
    base = {"storage": str(tmp_path / "s"), "stages": stages,
            "train_upsampler": {"model": {"image_size": 32, "low_res_size": 16}},
            "train_upsampler2": {"model": {"image_size": 64, "low_res_size": 32}}}
    cfg = validate(base)
    assert "train_upsampler2" not in validate({}).stages  # optional: only when listed
    assert [s.name for s in plan(cfg)][-4:] == ["train_upsampler", "train_upsampler2", "evaluate", "register"]
    assert "train_upsampler2" in DAG["evaluate"].inputs(cfg) and "train_upsampler2" in register_inputs(cfg)

    with pytest.raises(ConfigError, match="train_upsampler2 .* without train_upsampler"):
        validate({**base, "stages": [s for s in stages if s != "train_upsampler"]})
    mismatched = validate({**base, "train_upsampler2": {"model": {"image_size": 128, "low_res_size": 64}}})
    with pytest.raises(ConfigError, match=r"train_upsampler2.model.low_res_size is 64 but train_upsampler makes 32px"):
        preflight(mismatched, ["train_upsampler2"])
    preflight(cfg, ["train_upsampler2"])  # sizes that chain pass


def test_stack_without_the_first_upsampler_is_refused(tmp_path):
    from tasks.stack import StackError, load_stack_parts

    up = tmp_path / "upsampler2"
    checkpoint.save(sizes.build("upsampler", "tiny"), up)
    with pytest.raises(StackError, match="second upsampler .* no first one"):
        load_stack_parts({"clip": tmp_path, "prior": tmp_path, "decoder": tmp_path, "upsampler2": up})
