"""The one training interface (models.objective, models.sizes) for every kind: batch contracts,
randomness carried by the batch, and data parallelism.

The DDP test is the point of the protocol: 2 processes x batch b, each through
DistributedDataParallel, take one SGD step and must end where 1 process x batch 2b ends, given the
same draws (timesteps, noise, dropout masks, crops) through the batch's optional keys. An
objective that ran a forward through the unwrapped module would skip DDP's gradient averaging
and each rank would step on its own half-batch gradient.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from models import sizes
from models.objective import BatchError, check_batch
from models.pca import fit_pca

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = sorted(sizes.KINDS)
OVERRIDES = {"upsampler": dict(noise_aug_max=0.25)}  # exercise the conditioning augmentation keys too
LR = 0.5
B = 2  # per-rank batch


def tiny(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny network of the kind with random non-zero weights everywhere (diffusers zero-inits
    output layers, which would leave most gradients zero and the comparison vacuous)."""
    torch.manual_seed(seed)
    model = sizes.build(kind, "tiny", **OVERRIDES.get(kind, {}))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    if kind == "ar_prior":
        c = model.config
        z_i = F.normalize(torch.randn(512, c.embed_dim, generator=g) + 0.3, dim=-1)
        z_t = F.normalize(z_i + 0.5 * torch.randn(512, c.embed_dim, generator=g), dim=-1)
        model.set_basis(fit_pca(z_i, c.kept_dims, c.num_buckets, (z_i * z_t).sum(-1), c.similarity_buckets))
    return model


def make_batch(kind: str, model: torch.nn.Module, n: int, seed: int = 0, randomness: bool = True) -> dict:
    """A batch of n rows meeting the kind's contract; with `randomness`, every optional key that
    carries a random draw is filled too, so the loss is a function of the batch alone."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    unit = lambda d: F.normalize(torch.randn(n, d, generator=g), dim=-1)  # noqa: E731
    coin = lambda p=0.4: torch.rand(n, generator=g) < p  # noqa: E731

    def caption(length: int, width: int):
        lengths = torch.randint(1, length + 1, (n,), generator=g)
        return torch.randn(n, length, width, generator=g), torch.arange(length)[None] < lengths[:, None]

    def image(size: int):
        return torch.rand(n, 3, size, size, generator=g) * 2 - 1

    if kind in ("prior", "ar_prior"):
        states, mask = caption(c.text_len, c.text_dim)
        batch = {"image_emb": unit(c.embed_dim), "text_emb": unit(c.embed_dim), "text_states": states, "text_mask": mask}
        if randomness:
            batch["drop_text"] = coin()
            if kind == "prior":
                batch["t"] = torch.randint(0, c.num_train_timesteps, (n,), generator=g)
                batch["noise"] = torch.randn(n, c.embed_dim, generator=g)
    elif kind == "decoder":
        states, mask = caption(5, c.text_dim)
        batch = {"image": image(c.image_size), "image_emb": unit(c.embed_dim), "text_emb": unit(c.embed_dim),
                 "text_states": states, "text_mask": mask}
        if randomness:
            batch.update(t=torch.randint(0, c.num_train_timesteps, (n,), generator=g),
                         noise=torch.randn(n, 3, c.image_size, c.image_size, generator=g),
                         drop_image=coin(0.3), drop_text=coin(0.5))
    elif kind == "upsampler":
        batch = {"image": image(c.image_size)}
        if randomness:
            k = c.train_crop
            batch.update(crop=torch.randint(0, c.image_size - k + 1, (n, 2), generator=g),
                         t=torch.randint(0, c.num_train_timesteps, (n,), generator=g),
                         noise=torch.randn(n, 3, k, k, generator=g),
                         aug_level=torch.randint(0, int(c.noise_aug_max * c.num_train_timesteps), (n,), generator=g),
                         aug_noise=torch.randn(n, 3, k, k, generator=g))
    elif kind == "clip":
        text = c.arch["text_cfg"]
        length = text["context_length"]
        ends = torch.randint(3, length, (n,), generator=g)  # end-of-text position; 0-padding after it
        tokens = torch.randint(1, text["vocab_size"] - 2, (n, length), generator=g)
        tokens[:, 0] = text["vocab_size"] - 2  # start of text
        tokens = torch.where(torch.arange(length)[None] < ends[:, None], tokens, 0)
        tokens[torch.arange(n), ends] = text["vocab_size"] - 1  # end of text: the pooled position
        batch = {"image": image(c.arch["vision_cfg"]["image_size"]), "text_tokens": tokens}
    else:
        raise AssertionError(f"no test batch for kind {kind!r}")
    check_batch(sizes.batch_contract(kind), batch, kind)
    return batch


def sgd_step(network: torch.nn.Module, parameters_of: torch.nn.Module, kind: str, batch: dict) -> dict:
    opt = torch.optim.SGD(parameters_of.parameters(), lr=LR)
    loss, _ = sizes.objective(kind)(network, batch)
    loss.backward()
    opt.step()
    return {name: p.detach().clone() for name, p in parameters_of.named_parameters()}


# ----- contracts and randomness ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_check_batch_names_the_missing_key(kind):
    model = tiny(kind)
    batch = make_batch(kind, model, 3)
    contract = sizes.batch_contract(kind)
    required = [k for k, f in contract.items() if not f.optional]
    assert required and set(required) <= set(batch)
    for key in required:
        partial = {k: v for k, v in batch.items() if k != key}
        with pytest.raises(BatchError, match=f"missing \\['{key}'\\]"):
            check_batch(contract, partial, kind)
        with pytest.raises(BatchError, match=key):  # the objective checks too, before any work
            sizes.objective(kind)(model, partial)
    key = required[0]
    with pytest.raises(BatchError, match=f"{key}.*dtype"):
        check_batch(contract, {**batch, key: batch[key].to(torch.float64 if contract[key].dtype == "long" else torch.int64)})
    with pytest.raises(BatchError, match=r"has B=\d but batch"):
        check_batch(contract, {**batch, key: batch[key][:2]})


@pytest.mark.parametrize("kind", KINDS)
def test_randomness_in_the_batch_fixes_the_loss(kind):
    """With every random draw in the batch, the generator no longer matters; without, it does
    (except CLIP's loss, which draws nothing)."""
    model = tiny(kind)
    objective = sizes.objective(kind)
    fixed = make_batch(kind, model, 8)
    a, metrics = objective(model, fixed, torch.Generator().manual_seed(1))
    b, _ = objective(model, fixed, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert "loss" in metrics and all(v.ndim == 0 and not v.requires_grad for v in metrics.values())
    assert torch.equal(metrics["loss"], a.detach())
    free = make_batch(kind, model, 8, randomness=False)
    c, _ = objective(model, free, torch.Generator().manual_seed(1))
    d, _ = objective(model, free, torch.Generator().manual_seed(2))
    assert torch.equal(c, objective(model, free, torch.Generator().manual_seed(1))[0])
    assert torch.equal(c, d) == (kind in ("clip",))


def test_clip_loss_is_open_clips():
    from open_clip.loss import ClipLoss

    model = tiny("clip")
    batch = make_batch("clip", model, 6)
    loss, metrics = sizes.objective("clip")(model, batch)
    image_features, text_features, scale = model(batch["image"], batch["text_tokens"])
    torch.testing.assert_close(loss, ClipLoss()(image_features, text_features, scale))
    logits = scale * image_features @ text_features.T
    torch.testing.assert_close(metrics["accuracy"], (logits.argmax(1) == torch.arange(6)).float().mean())


# ----- data parallel -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_process_group():
    """A gloo process group of world size 1 in this process (DDP needs one)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", KINDS)
def test_objective_runs_under_ddp(kind, one_process_group):
    """Wrapped in DistributedDataParallel the objective gives the loss and gradients of the
    bare network (config and schedulers are read through the wrapper)."""
    bare, wrapped = tiny(kind), tiny(kind)
    batch = make_batch(kind, bare, 3)
    net = DDP(wrapped)
    forwards = []
    net.register_forward_pre_hook(lambda module, args: forwards.append(1))
    a, _ = sizes.objective(kind)(bare, batch)
    b, _ = sizes.objective(kind)(net, batch)
    assert forwards and torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    a.backward()
    b.backward()
    grads = dict(wrapped.named_parameters())
    for name, p in bare.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def _ddp_worker(rank: int, world: int, port: int, directory: str) -> None:
    """One rank: for every kind, its half of the 2b batch, one SGD step through DDP, parameters out."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for kind in KINDS:
            model = tiny(kind)
            full = make_batch(kind, model, world * B, seed=7)
            half = {k: v[rank * B:(rank + 1) * B] for k, v in full.items()}
            params = sgd_step(DDP(model), model, kind, half)
            save_file({k: v.contiguous() for k, v in params.items()}, os.path.join(directory, f"{kind}.{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_step_like_one_process_with_the_whole_batch(tmp_path):
    """2 gloo processes x batch b == 1 process x batch 2b (atol 1e-5), for every kind.
    CLIP is exact because its ClipLoss gathers features with gradient (see models.clip.training_loss)."""
    world = 2
    context = mp.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail("the DDP ranks did not finish in 300 s")
    for kind in KINDS:
        ranks = [load_file(str(tmp_path / f"{kind}.{r}.safetensors")) for r in range(world)]
        model = tiny(kind)
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        full = make_batch(kind, model, world * B, seed=7)
        whole = sgd_step(model, model, kind, full)
        first_half = tiny(kind)
        alone = sgd_step(first_half, first_half, kind, {k: v[:B] for k, v in full.items()})
        for name, expected in whole.items():
            assert torch.equal(ranks[0][name], ranks[1][name]), (kind, name)  # DDP: identical replicas
            torch.testing.assert_close(ranks[0][name], expected, rtol=0, atol=1e-5, msg=f"{kind} {name}")
        # the comparison can fail: the step moves the weights, and a rank stepping on its own
        # half-batch gradient (no averaging) would end elsewhere
        moved = max((whole[k] - before[k]).abs().max().item() for k in whole)
        missed = max((alone[k] - whole[k]).abs().max().item() for k in whole)
        assert moved > 1e-3 and missed > 1e-4, (kind, moved, missed)
