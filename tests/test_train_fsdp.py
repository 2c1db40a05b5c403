"""train_*.strategy: fsdp through Ray Train on 2 CPU workers (gloo): the same steps as DDP, full
safetensors weights written by rank 0, and a resume that restores each rank's optimizer shard."""

import dataclasses

import pytest
import torch

from models import checkpoint, sizes
from tasks import training
from tasks.context import StageContext


def _rows(config, n: int) -> list[dict]:
    """Prior batches that carry their own randomness (t, noise, text dropout)."""
    g = torch.Generator().manual_seed(0)
    d, L = config.embed_dim, 5
    return [{
        "image_emb": torch.randn(d, generator=g).numpy(), "text_emb": torch.randn(d, generator=g).numpy(),
        "text_states": torch.randn(L, config.text_dim, generator=g).numpy(), "noise": torch.randn(d, generator=g).numpy(),
        "t": int(torch.randint(0, 1000, (1,), generator=g)), "drop_text": bool(i % 3 == 0),
    } for i in range(n)]


def test_fsdp_takes_the_same_steps_as_ddp_and_resumes(ray_local, tmp_path):
    """2 workers × b rows, every step sees all 2b rows (one epoch), constant lr. FSDP is stopped at
    step 1 and resumed to step 3 from its checkpoint (one optimizer shard per rank); DDP runs the 3
    steps straight. Weights and EMA must agree, so FSDP's steps and its saved state are both right."""
    import ray

    config = sizes.config_for("prior", "tiny")
    b = 4
    dataset = ray.data.from_items(_rows(config, 2 * b))
    init = tmp_path / "init"
    torch.manual_seed(1)
    checkpoint.save(sizes.build("prior", "tiny"), init)

    def fit(strategy: str, steps: int) -> dict:
        out = tmp_path / strategy
        out.mkdir(exist_ok=True)
        # A large AdamW eps makes a step ≈ lr·m/(√v + 1): gradients, not round-off, are compared.
        cfg = training.TrainConfig(steps=steps, batch_size=b, workers=2, strategy=strategy, warmup_steps=0,
                                   min_lr_ratio=1.0, lr=3.0, adam_eps=1.0, weight_decay=0.0, checkpoint_every=1,
                                   val_fraction=0.0, init_from=str(init), grad_clip=None, ema_decay=0.5)
        ctx = StageContext(f"train_{strategy}", tmp_path, out, {}, seed=0, show_progress=False)
        spec = training.TrainSpec(kind="prior", batches=training.ToDevice)
        counts = training.fit(spec, cfg, ctx, dataclasses.asdict(config), dataset, None)
        assert counts["steps"] == steps
        weights = {name: checkpoint.load(out / name).state_dict() for name in ("network", "ema")}
        return {"counts": counts, **weights}

    before = checkpoint.load(init).state_dict()
    fsdp_first = fit("fsdp", 1)
    for key in before:  # full shapes: rank 0 wrote the whole network, not its shard
        assert fsdp_first["network"][key].shape == before[key].shape
    fsdp, ddp = fit("fsdp", 3), fit("ddp", 3)
    assert fsdp["counts"]["resumed_from_step"] == 1 and ddp["counts"]["resumed_from_step"] == 0
    assert any(not torch.allclose(ddp["network"][k], fsdp_first["network"][k]) for k in before), "steps 2 and 3 changed nothing"
    for name in ("network", "ema"):
        for key in before:
            torch.testing.assert_close(fsdp[name][key], ddp[name][key], atol=1e-5, rtol=1e-4, msg=f"{name}.{key}")


def test_fsdp_with_one_worker_is_plain_training():
    """One worker has nothing to shard: the loop runs unwrapped, so the setting is accepted anywhere."""
    cfg = training.TrainConfig(strategy="fsdp")
    assert cfg.strategy == "fsdp" and cfg.workers == 1
    with pytest.raises(ValueError, match="strategy"):
        training.TrainConfig(strategy="deepspeed")
