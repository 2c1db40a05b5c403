"""GPU readiness of every network's forward: no device->host reads (a sync on an accelerator),
and `torch.compile` works, in one graph, with eager's numbers and gradients."""

from __future__ import annotations

import pytest
import torch

from models import sizes

KINDS = ["prior", "ar_prior", "decoder", "upsampler"]
OVERRIDES = {"decoder": dict(image_size=16, attention_resolutions=[8])}
B = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def network_inputs(kind: str, net: torch.nn.Module, g: torch.Generator | None = None) -> tuple:
    """One forward's arguments with the awkward cases in: caption padding, rows with and without
    classifier-free-guidance dropout."""
    c = net.config
    randn = lambda *shape: torch.randn(shape, generator=g)  # noqa: E731
    t = torch.tensor([3, 900])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    if kind == "prior":
        return randn(B, c.embed_dim), t, randn(B, c.embed_dim), randn(B, 5, c.text_dim), mask
    if kind == "ar_prior":
        tokens = torch.randint(0, c.num_buckets, (B, c.kept_dims - 1), generator=g)
        return tokens, torch.tensor([0, c.similarity_buckets - 1]), randn(B, c.embed_dim), randn(B, 5, c.text_dim), mask, torch.tensor([False, True])
    if kind == "decoder":
        x = randn(B, c.in_channels, c.image_size, c.image_size)
        return x, t, randn(B, c.embed_dim), randn(B, c.embed_dim), randn(B, 5, c.text_dim), mask, torch.tensor([False, True]), torch.tensor([True, False])
    x = randn(B, c.in_channels, c.image_size, c.image_size)
    return x, t, randn(*x.shape)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_reads_no_tensor_values(kind):
    """On the meta device tensors have no values: any .item(), .tolist(), bool(), int(),
    torch.equal or data-dependent shape (nonzero, masking) raises. A forward that runs there
    never makes an accelerator wait for the host."""
    with torch.device("meta"):
        net = sizes.build(kind, "tiny", **OVERRIDES.get(kind, {}))
        args = network_inputs(kind, net)
        for training in (True, False):
            net.train(training)
            out = net(*args)
            assert out.device.type == "meta" and out.shape[0] == B


def _perturbed(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    net = sizes.build(kind, "tiny", **OVERRIDES.get(kind, {}))
    with torch.no_grad():  # non-zero everywhere (diffusers zero-inits output convs)
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return net


@pytest.mark.parametrize("kind", KINDS)
def test_torch_compile_forward_backward_matches_eager(kind):
    """Each network compiles into one graph (fullgraph: no graph breaks), and a compiled
    forward + backward gives eager's output and parameter gradients. Dynamo + AOTAutograd
    (aot_eager) capture the graphs training would run; inductor's code is checked below."""
    net = _perturbed(kind).train()
    args = network_inputs(kind, net, torch.Generator().manual_seed(1))
    grads = []
    torch._dynamo.reset()
    for model in (net, torch.compile(net, fullgraph=True, backend="aot_eager")):
        net.zero_grad()
        out = model(*args)
        weight = torch.linspace(-1, 1, out.numel()).view_as(out)
        (out.float() * weight).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
    (eager, eager_grads), (compiled, compiled_grads) = grads
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4, msg=kind)
    assert eager_grads.keys() == compiled_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-4, rtol=1e-3, msg=f"{kind}: {name}")


def test_decoder_compiled_by_inductor_samples_as_eager():
    """Inductor's generated code (C++ on CPU) for the decoder's sampling forward, where sampling
    spends its compute, gives eager's numbers. Forward only: a backward graph doubles the
    codegen (~1.5 min on 2 CPU cores) and is the same capture as aot_eager's above."""
    net = _perturbed("decoder").eval()
    args = network_inputs("decoder", net, torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch.no_grad():
        eager = net(*args)
        compiled = torch.compile(net, fullgraph=True)(*args)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_fast_blocks_replace_all_or_fail_loudly():
    """decoder.fast_blocks swaps every diffusers ResnetBlock2D, or none and says why (with the
    installed diffusers version) when a block is not the one its fast forward was written for."""
    import diffusers
    from diffusers import UNet2DConditionModel
    from diffusers.models.resnet import ResnetBlock2D

    from models.decoder import SIZES, _ResnetBlock, fast_blocks, unet_kwargs
    from models.diffusers_blocks import UnexpectedDiffusersBlock

    kwargs = unet_kwargs(SIZES["tiny"])
    unet = fast_blocks(UNet2DConditionModel(**kwargs))
    resnets = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    assert resnets and all(type(m) is _ResnetBlock for m in resnets)

    # a setting the fast forward does not implement ("default" time embedding: add, not scale-shift)
    other = UNet2DConditionModel(**{**kwargs, "resnet_time_scale_shift": "default"})
    with pytest.raises(UnexpectedDiffusersBlock, match=f"installed diffusers \\({diffusers.__version__}\\).*time_embedding_norm = 'default'"):
        fast_blocks(other)
    assert not any(type(m) is _ResnetBlock for m in other.modules())  # nothing half-swapped

    # a submodule the fast forward would skip (as a new diffusers feature would add)
    unet = UNet2DConditionModel(**kwargs)
    last = [m for m in unet.modules() if type(m) is ResnetBlock2D][-1]
    last.norm_extra = torch.nn.Identity()
    with pytest.raises(UnexpectedDiffusersBlock, match="norm_extra"):
        fast_blocks(unet)
    assert not any(type(m) is _ResnetBlock for m in unet.modules())


@pytest.mark.parametrize("change", ["residual", "extra", "norm_type"])
def test_prior_refuses_a_transformer_its_forward_was_not_written_for(change):
    import diffusers

    from models.diffusers_blocks import UnexpectedDiffusersBlock
    from models.prior import DiffusionPrior

    prior = sizes.build("prior", "tiny")
    transformer = prior.transformer
    block = transformer.transformer_blocks[1]
    if change == "residual":
        block.attn1.residual_connection = True
    elif change == "extra":
        block.attn1.norm_added = torch.nn.LayerNorm(4)
    else:
        block.norm_type = "ada_norm"
    with pytest.raises(UnexpectedDiffusersBlock, match=f"transformer_blocks.1.*installed diffusers \\({diffusers.__version__}\\)"):
        DiffusionPrior(prior.config, transformer=transformer)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_trains_in_fp32_and_says_so(monkeypatch, native):
    """precision: bf16 autocasts on a CPU with native bf16; on one without (AVX2 only) emulated bf16 is
    many times slower than fp32, so training falls back to fp32 with a warning."""
    import warnings

    from tasks import training

    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with training._autocast("bf16", torch.device("cpu")):
            out = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert out.dtype == (torch.bfloat16 if native else torch.float32)
    assert any("no native bf16" in str(w.message) for w in caught) == (not native)
    with training._autocast("fp32", torch.device("cpu")):
        assert torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4)).dtype == torch.float32
