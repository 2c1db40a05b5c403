"""Training throughput (samples/s) of our diffusion prior and decoder, and of DALLE2-pytorch's
DiffusionPrior and Unet/Decoder at matched parameter counts, in the same process. Prints JSON.

    python benchmarks/train_step.py                      # all models, default sizes
    python benchmarks/train_step.py --only prior --seconds 5

A training step is what a training loop does: loss (noise, timesteps and condition dropout
drawn inside) + backward + AdamW step, fp32 unless --bf16 (CPU/GPU autocast). Random inputs of
the right shapes; throughput does not depend on their values. Nothing here asserts on time.

DALLE2-pytorch (lucidrains/DALLE2-pytorch) is optional. It requires open_clip_torch<3, which
clashes with this project's pin, so do not install it into the project venv; install it and its
small pure-Python deps beside it and put that directory on PYTHONPATH, e.g.

    pip install --no-deps --target /tmp/d2lib dalle2-pytorch==1.15.6 einops einx ema-pytorch \
        rotary-embedding-torch resize-right x-clip CoCa-pytorch vector-quantize-pytorch \
        torch-einops-utils frozendict loguru beartype embedding-reader pytorch-warmup \
        clip-anytorch kornia kornia_rs accelerate
    PYTHONPATH=/tmp/d2lib python benchmarks/train_step.py

Captions: the prior gets token states of captions 6-20 CLIP tokens long (of 77; --caption-tokens),
zero-padded with a mask, as a CLIP text encoder produces them. DALLE2-pytorch always runs all 77
positions; ours cuts the padding shared by the batch (see models/prior.py), which is most of its
advantage: `--caption-tokens 77 77` measures the no-padding case. On a shared, busy machine use
`--threads 1`; contenders are timed interleaved so that load from other processes hits both.

Matching: DALLE2-pytorch's prior network is as wide as the CLIP embedding (ours too in these
sizes), so we keep its width and heads and choose the depth whose parameter count is closest to
ours; its U-Net is given our channel multipliers, resnet blocks per level and attention levels,
and the base width (a multiple of 8) whose parameter count is closest to ours.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from models.prior import SIZES as PRIOR_SIZES  # noqa: E402
from models.prior import DiffusionPrior, PriorConfig  # noqa: E402
from models.sizes import objective  # noqa: E402

# Two prior sizes: ~4M (STACK.md's CPU reference point) and the named "small" (21M).
PRIOR_BENCH = {
    "w256": (PriorConfig(embed_dim=256, text_dim=256, text_len=77, num_heads=4, head_dim=64, num_layers=4), 64),
    "small": (PRIOR_SIZES["small"], 32),
}
DECODER_BENCH = {"tiny": 16, "small": 8}  # named decoder size -> batch


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def measure(steps: dict, batch: int, seconds: float, min_rounds: int = 3, warmup: int = 1) -> dict:
    """Time each `steps[name]()`, interleaved (A, B, A, B, ...) so that a busy shared machine slows
    all contenders alike; stops after `seconds` per contender (and at least min_rounds rounds)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or time.perf_counter() - start < seconds * len(steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    out = {}
    for name, ts in times.items():
        step_s = sorted(ts)[len(ts) // 2]  # median: robust to stalls from other processes
        out[name] = {"batch": batch, "steps": len(ts), "step_s_median": round(step_s, 4), "samples_per_s": round(batch / step_s, 2)}
    return out


def train_step(model: torch.nn.Module, loss_fn, amp: bool, device: str):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        ctx = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return step


# --- ours -----------------------------------------------------------------------------------


def caption_states(batch: int, text_len: int, width: int, tokens: tuple[int, int], device: str):
    """Token states of captions with lengths uniform in `tokens` (inclusive), zero-padded to
    text_len, and their mask: what a CLIP text encoder hands the prior."""
    lengths = torch.randint(tokens[0], tokens[1] + 1, (batch,))
    mask = (torch.arange(text_len)[None] < lengths[:, None]).to(device)
    return torch.randn(batch, text_len, width, device=device) * mask[..., None], mask


def our_prior(config: PriorConfig, batch: int, device: str, tokens: tuple[int, int]):
    model = DiffusionPrior(config).to(device)
    states, mask = caption_states(batch, config.text_len, config.text_dim, tokens, device)
    data = {
        "image_emb": F.normalize(torch.randn(batch, config.embed_dim, device=device), dim=-1),
        "text_emb": F.normalize(torch.randn(batch, config.embed_dim, device=device), dim=-1),
        "text_states": states,
        "text_mask": mask,
    }
    loss = objective("prior")
    return model, lambda: loss(model, data)[0]


def our_decoder(size: str, batch: int, device: str, text_len: int = 77):
    from models.decoder import SIZES, Decoder

    config = SIZES[size]
    model = Decoder(config).to(device)
    s = config.image_size
    x0 = torch.rand(batch, config.in_channels, s, s, device=device) * 2 - 1
    data = {
        "image": x0,
        "image_emb": F.normalize(torch.randn(batch, config.embed_dim, device=device), dim=-1),
        "text_emb": F.normalize(torch.randn(batch, config.embed_dim, device=device), dim=-1),
        "text_states": torch.randn(batch, text_len, config.text_dim, device=device),
    }
    loss = objective("decoder")
    return model, config, lambda: loss(model, data)[0]


# --- DALLE2-pytorch ---------------------------------------------------------------------------


def d2_prior(config: PriorConfig, target_params: int, batch: int, device: str, tokens: tuple[int, int]):
    from dalle2_pytorch import DiffusionPrior as D2Prior
    from dalle2_pytorch import DiffusionPriorNetwork

    def build(depth):
        net = DiffusionPriorNetwork(
            dim=config.embed_dim, depth=depth, dim_head=config.head_dim, heads=config.num_heads,
            num_timesteps=config.num_train_timesteps, max_text_len=config.text_len,
        )
        return D2Prior(
            net=net, image_embed_dim=config.embed_dim, timesteps=config.num_train_timesteps,
            cond_drop_prob=config.text_drop_prob, condition_on_text_encodings=True,
        )

    with torch.device("meta"):
        depth = min(range(1, 33), key=lambda d: abs(n_params(build(d)) - target_params))
    model = build(depth).to(device)
    zi = F.normalize(torch.randn(batch, config.embed_dim, device=device), dim=-1)
    zt = F.normalize(torch.randn(batch, config.embed_dim, device=device), dim=-1)
    states, _ = caption_states(batch, config.text_len, config.embed_dim, tokens, device)  # it masks zero rows
    # its forward scales image_embed in place, hence the clone
    return model, {"depth": depth}, lambda: model(text_embed=zt, image_embed=zi.clone(), text_encodings=states)


def d2_decoder(config, target_params: int, batch: int, device: str, text_len: int = 77):
    from dalle2_pytorch import Decoder as D2Decoder
    from dalle2_pytorch import Unet as D2Unet

    chans = config.block_out_channels
    mults = tuple(c / chans[0] for c in chans)
    attn = tuple(r in config.attention_resolutions for r in config.block_resolutions())

    def build_unet(dim):
        return D2Unet(
            dim=dim, image_embed_dim=config.embed_dim, text_embed_dim=config.text_dim, channels=config.in_channels,
            dim_mults=tuple(int(round(m)) if float(m).is_integer() else m for m in mults),
            cond_on_image_embeds=True, cond_on_text_encodings=True, self_attn=attn,
            num_resnet_blocks=config.layers_per_block, attn_dim_head=32, attn_heads=max(1, dim // 32), resnet_groups=8,
        )

    with torch.device("meta"):
        dim = min(range(8, 8 * 65, 8), key=lambda d: abs(n_params(build_unet(d)) - target_params))
    unet = build_unet(dim)
    model = D2Decoder(
        unet=unet, image_size=config.image_size, timesteps=config.num_train_timesteps,
        image_cond_drop_prob=config.image_drop_prob, text_cond_drop_prob=config.text_drop_prob, learned_variance=False,
    ).to(device)
    s = config.image_size
    images = torch.rand(batch, config.in_channels, s, s, device=device)  # it normalises [0, 1] itself
    image_emb = F.normalize(torch.randn(batch, config.embed_dim, device=device), dim=-1)
    states = torch.randn(batch, text_len, config.text_dim, device=device)
    return model, {"dim": dim}, lambda: model(images, image_embed=image_emb, text_encodings=states)


# --- driver -----------------------------------------------------------------------------------


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["prior", "decoder"], default=None)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per measurement (after warm-up)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for all models")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-dalle2", action="store_true")
    parser.add_argument("--caption-tokens", type=int, nargs=2, default=(6, 20), metavar=("MIN", "MAX"),
                        help="caption lengths in CLIP tokens for the prior (of 77); 77 77 for no padding")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    report = {
        "benchmark": "train_step",
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "dtype": "bf16-autocast" if args.bf16 else "fp32",
        "prior_caption_tokens": list(args.caption_tokens),
        "results": [],
        "unavailable": {},
    }
    d2_ok = False
    if args.skip_dalle2:
        report["unavailable"]["dalle2_pytorch"] = "skipped (--skip-dalle2)"
    else:
        try:
            import dalle2_pytorch

            report["dalle2_pytorch"] = getattr(dalle2_pytorch, "__version__", None) or _dist_version("dalle2-pytorch")
            d2_ok = True
        except Exception as e:  # noqa: BLE001 - any import failure means "not available"
            report["unavailable"]["dalle2_pytorch"] = (
                f"not importable ({type(e).__name__}: {e}); see this script's docstring for a side install"
            )

    ratios = {}

    def compare(kind, size, batch, ours, theirs_builder, extra=None):
        """ours = (model, loss_fn); theirs_builder(params) -> (model, extra, loss_fn), or None."""
        contenders = {"unclip-pipeline": (ours[0], ours[1], {})}
        if d2_ok:
            model, info, fn = theirs_builder(n_params(ours[0]))
            contenders["dalle2_pytorch"] = (model, fn, info)
        steps = {name: train_step(m, fn, args.bf16, args.device) for name, (m, fn, _) in contenders.items()}
        timed = measure(steps, batch, args.seconds)
        for name, (m, _, info) in contenders.items():
            r = {"model": kind, "size": size, "impl": name, "params": n_params(m), **(extra or {}), **info, **timed[name]}
            report["results"].append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)  # progress; the report goes to stdout
        if d2_ok:
            ratios[f"{kind}/{size}"] = round(timed["unclip-pipeline"]["samples_per_s"] / timed["dalle2_pytorch"]["samples_per_s"], 2)

    if args.only in (None, "prior"):
        for size, (config, batch) in PRIOR_BENCH.items():
            tokens = tuple(args.caption_tokens)
            model, fn = our_prior(config, batch, args.device, tokens)
            compare("prior", size, batch, (model, fn), lambda p: d2_prior(config, p, batch, args.device, tokens))
    if args.only in (None, "decoder"):
        try:
            import models.decoder  # noqa: F401
        except ImportError as e:
            report["unavailable"]["decoder"] = f"models.decoder is not importable yet ({e})"
        else:
            for size, batch in DECODER_BENCH.items():
                model, config, fn = our_decoder(size, batch, args.device)
                compare("decoder", size, batch, (model, fn), lambda p: d2_decoder(config, p, batch, args.device),
                        {"image_size": config.image_size})
    report["speedup_vs_dalle2_pytorch"] = ratios
    print(json.dumps(report, indent=2))
    return report


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
