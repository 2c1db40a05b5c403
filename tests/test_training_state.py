"""Training state: EMA against its closed form, the LR schedule, exact resume in a fresh process,
the on-disk format (safetensors + JSON only) and its errors."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from models import checkpoint, decoder
from models.checkpoint import CheckpointError
from models.pca import fit_pca
from models.sizes import build, objective
from models.training_state import EMA, load_training_state, refit_total_steps, save_training_state, warmup_cosine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["prior", "ar_prior", "decoder", "upsampler"]
N, M = 3, 3  # steps before and after the resume


# ----- a tiny training run per kind, through the kind's objective (models.sizes.objective) -----

def _network(kind: str) -> torch.nn.Module:
    if kind == "decoder":
        return decoder.Decoder(dataclasses.replace(decoder.SIZES["tiny"], image_size=16, attention_resolutions=[8]))
    network = build(kind, "tiny")
    if kind == "ar_prior":  # a basis fitted on fixed data (buffers, restored from the checkpoint)
        g = torch.Generator().manual_seed(7)
        z = F.normalize(torch.randn(256, network.config.embed_dim, generator=g), dim=-1)
        c = network.config
        network.set_basis(fit_pca(z, c.kept_dims, c.num_buckets, (z * z.roll(1, 0)).sum(-1), c.similarity_buckets))
    return network


def _batch(kind: str, network, step: int, b: int = 2) -> dict[str, torch.Tensor]:
    g, c = torch.Generator().manual_seed(1000 + step), network.config  # data order fixed by the test
    if kind in ("prior", "ar_prior"):
        return {"image_emb": F.normalize(torch.randn(b, c.embed_dim, generator=g), dim=-1),
                "text_emb": F.normalize(torch.randn(b, c.embed_dim, generator=g), dim=-1),
                "text_states": torch.randn(b, c.text_len, c.text_dim, generator=g)}
    if kind == "decoder":
        return {"image": torch.rand(b, 3, c.image_size, c.image_size, generator=g) * 2 - 1,
                "image_emb": torch.randn(b, c.embed_dim, generator=g), "text_emb": torch.randn(b, c.embed_dim, generator=g),
                "text_states": torch.randn(b, 4, c.text_dim, generator=g)}
    return {"image": torch.rand(b, 3, c.image_size, c.image_size, generator=g) * 2 - 1}


def _loss(kind: str, network, batch: dict, generator: torch.Generator) -> torch.Tensor:
    return objective(kind)(network, batch, generator)[0]


def _parts(kind: str, init_seed: int):
    torch.manual_seed(init_seed)
    network = _network(kind).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=0.01)
    return network, EMA(network, decay=0.9), optimizer, warmup_cosine(optimizer, 2, N + M, 0.1), torch.Generator().manual_seed(5)


def _train(kind, network, ema, optimizer, lr_scheduler, generator, start: int, stop: int) -> list[torch.Tensor]:
    losses = []
    for step in range(start, stop):
        batch = _batch(kind, network, step)
        # randomness from every process-wide RNG the state restores: torch (also dropout), python, numpy
        batch = {k: v + 0.01 * torch.randn_like(v) for k, v in batch.items()}
        scale = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())
        loss = _loss(kind, network, batch, generator) * scale
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        ema.update(network)
        losses.append(loss.detach())
    return losses


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)


def _resume_main(root: str, out: str) -> None:
    """Run in a fresh process: rebuild each kind from another seed, load its state, take M steps."""
    torch.set_num_threads(1)
    results = {}
    for kind in KINDS:
        _seed_everything(99)
        network, ema, optimizer, lr_scheduler, generator = _parts(kind, init_seed=99)
        step, extra = load_training_state(Path(root) / kind, network=network, ema=ema, optimizer=optimizer,
                                          lr_scheduler=lr_scheduler, generator=generator)
        assert step == N and extra == {"kind": kind, "seen": [N, 2 * N]}, (step, extra)
        results[f"{kind}/losses"] = torch.stack(_train(kind, network, ema, optimizer, lr_scheduler, generator, N, N + M))
        results.update({f"{kind}/network/{k}": v for k, v in network.state_dict().items()})
        results.update({f"{kind}/ema/{k}": v for k, v in ema.module.state_dict().items()})
    save_file({k: v.contiguous() for k, v in results.items()}, out)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Per kind: the uninterrupted N+M-step run here, and the N steps + fresh-process M steps run."""
    root = tmp_path_factory.mktemp("states")
    full = {}
    for kind in KINDS:
        _seed_everything(0)
        parts = _parts(kind, init_seed=0)
        full[kind] = (_train(kind, *parts, 0, N + M), parts[0].state_dict(), parts[1].module.state_dict())
        _seed_everything(0)
        network, ema, optimizer, lr_scheduler, generator = _parts(kind, init_seed=0)
        _train(kind, network, ema, optimizer, lr_scheduler, generator, 0, N)
        save_training_state(root / kind, network=network, ema=ema, optimizer=optimizer, lr_scheduler=lr_scheduler,
                            step=N, extra={"kind": kind, "seen": [N, 2 * N]}, generator=generator)
    out = root / "resumed.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    code = f"from tests.test_training_state import _resume_main; _resume_main({str(root)!r}, {str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return full, load_file(str(out))


@pytest.mark.parametrize("kind", KINDS)
def test_exact_resume_in_a_fresh_process(resumed, kind):
    full, got = resumed
    losses, network, ema = full[kind]
    torch.testing.assert_close(got[f"{kind}/losses"], torch.stack(losses[N:]), rtol=0, atol=1e-7)
    for name, state in (("network", network), ("ema", ema)):
        for k, v in state.items():
            torch.testing.assert_close(got[f"{kind}/{name}/{k}"], v, rtol=0, atol=1e-6, msg=f"{kind} {name} {k}")
    assert any(not torch.equal(ema[k], v) for k, v in network.items())  # the EMA is an average, not a copy


# ----- EMA -----

def _set_parameters(network, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return [p.detach().double().clone() for p in network.parameters()]


def test_ema_with_constant_decay_is_the_closed_form_average():
    d, k = 0.8, 5
    network = build("prior", "tiny")
    ws = [_set_parameters(network, 0)]
    ema = EMA(torch.compile(network), decay=d, warmup=False)  # a wrapped network: EMA keeps the plain class
    assert type(ema.module) is type(network) and not any(p.requires_grad for p in ema.module.parameters())
    for i in range(1, k + 1):
        ws.append(_set_parameters(network, i))
        ema.update(torch.compile(network))
    # ema_k = d^k w_0 + sum_{i=1..k} (1 - d) d^(k-i) w_i
    for j, p in enumerate(ema.module.parameters()):
        expected = d**k * ws[0][j] + sum((1 - d) * d ** (k - i) * ws[i][j] for i in range(1, k + 1))
        torch.testing.assert_close(p.double(), expected, rtol=0, atol=1e-6)


def test_ema_warmup_follows_the_documented_decay_and_buffers_are_copied():
    ema = EMA(build("prior", "tiny"), decay=0.95)  # warm-up is on by default
    decays = []
    for _ in range(200):
        decays.append(ema.current_decay())
        ema.num_updates += 1
    assert decays[:2] == pytest.approx([0.1, 2 / 11]) and decays[169] == pytest.approx(170 / 179)
    assert decays[171:] == [0.95] * 29  # capped once (1 + t) / (10 + t) reaches the decay

    network = build("ar_prior", "tiny")
    w0 = _set_parameters(network, 0)
    ema = EMA(network, decay=0.95)
    w1 = _set_parameters(network, 1)
    ema.update(network)  # decay 0.1
    w2 = _set_parameters(network, 2)
    network.pca_mean.fill_(3.0)
    ema.update(network)  # decay 2/11
    for p, a, b, c in zip(ema.module.parameters(), w0, w1, w2):
        torch.testing.assert_close(p.double(), 2 / 11 * (0.1 * a + 0.9 * b) + 9 / 11 * c, rtol=0, atol=1e-6)
    assert torch.equal(ema.module.pca_mean, network.pca_mean)  # buffers copied, not averaged


def test_warmup_cosine_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    lr_scheduler = warmup_cosine(optimizer, warmup_steps=4, total_steps=12, min_lr_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(optimizer.param_groups[0]["lr"] / 2.0)
        optimizer.step()
        lr_scheduler.step()
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert lrs[8] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lrs[12:] == pytest.approx([0.1] * 4)


def test_a_refit_cosine_end_survives_a_saved_and_loaded_state(tmp_path):
    network = build("prior", "tiny")
    optimizer = torch.optim.AdamW(network.parameters(), lr=1.0)
    lr_scheduler = warmup_cosine(optimizer, 1, 100, 0.1)
    refit_total_steps(lr_scheduler, 10)  # as a time budget does (tasks.training)
    save_training_state(tmp_path / "s", network=network, ema=EMA(network), optimizer=optimizer,
                        lr_scheduler=lr_scheduler, step=0)
    fresh_optimizer = torch.optim.AdamW(network.parameters(), lr=1.0)
    fresh = warmup_cosine(fresh_optimizer, 1, 100, 0.1)
    load_training_state(tmp_path / "s", network=network, ema=EMA(network), optimizer=fresh_optimizer, lr_scheduler=fresh)
    assert fresh.lr_lambdas[0](10) == pytest.approx(0.1)


# ----- format and errors -----

def _save_small(directory, network=None, step=3):
    network = network or build("prior", "tiny")
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    lr_scheduler = warmup_cosine(optimizer, 1, 10)
    ema = EMA(network)
    save_training_state(directory, network=torch.compile(network), ema=ema, optimizer=optimizer,
                        lr_scheduler=lr_scheduler, step=step, extra={"samples": 12})
    return network, ema, optimizer, lr_scheduler


def test_state_is_safetensors_and_json_only_and_models_load_from_it(tmp_path):
    network, ema, optimizer, lr_scheduler = _save_small(tmp_path / "state")
    _save_small(tmp_path / "state", step=7)  # replaces the previous state in place
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["state/ema/config.json", "state/ema/model.safetensors", "state/network/config.json",
                     "state/network/model.safetensors", "state/state.json", "state/state.safetensors"]
    for sub in ("network", "ema"):  # exported models are subdirectories in the models' own format
        assert type(checkpoint.load(tmp_path / "state" / sub)) is type(network)
    step, extra = load_training_state(tmp_path / "state", network=network, ema=ema, optimizer=optimizer, lr_scheduler=lr_scheduler)
    assert (step, extra) == (7, {"samples": 12})


def test_errors_name_the_path_and_what_differs(tmp_path):
    state = tmp_path / "state"
    network, ema, optimizer, lr_scheduler = _save_small(state)
    parts = dict(network=network, ema=ema, optimizer=optimizer, lr_scheduler=lr_scheduler)
    with pytest.raises(CheckpointError, match="missing.*does not exist"):
        load_training_state(tmp_path / "missing", **parts)

    other = build("prior", "tiny", num_layers=1)
    other_optimizer = torch.optim.AdamW(other.parameters())
    with pytest.raises(CheckpointError, match=r"network.*num_layers: saved 2, here 1"):
        load_training_state(state, network=other, ema=EMA(other), optimizer=other_optimizer, lr_scheduler=warmup_cosine(other_optimizer, 1, 2))
    with pytest.raises(CheckpointError, match="not JSON-able"):
        save_training_state(tmp_path / "bad", **parts, step=0, extra={"x": object()})
    assert not (tmp_path / "bad").exists()

    header = json.loads((state / "state.json").read_text())
    (state / "state.json").write_text(json.dumps({**header, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99 is newer"):
        load_training_state(state, **parts)
    (state / "state.json").write_text(json.dumps(header))

    for path in (state / "state.safetensors", state / "network" / "model.safetensors"):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=str(path)):
            load_training_state(state, **parts)
        path.write_bytes(data)
    (state / "state.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_training_state(state, **parts)
