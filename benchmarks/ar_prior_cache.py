"""AR prior sampling speed (tokens/s) with and without the key/value cache. Prints JSON.

    python benchmarks/ar_prior_cache.py                          # "small" size, batch 4, guidance 3
    python benchmarks/ar_prior_cache.py --kept-dims 64 --batch 2 --threads 1   # on a busy machine: one thread
    python benchmarks/ar_prior_cache.py --size paper --device cuda --batch 16

A random-init model of a named size (models/ar_prior.py SIZES) with a PCA basis fitted to random
unit vectors; full-length captions (text_len tokens, no padding). Tokens/s counts the k sampled
tokens of every row (batch * kept_dims per draw). Both paths draw the same tokens (tests check
that); the uncached path runs the whole sequence for each token, twice with guidance. Nothing
here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from models.ar_prior import ARPrior
from models.pca import fit_pca
from models.sizes import config_for


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(size: str = "small", kept_dims: int | None = None, batch: int = 4, guidance: float = 3.0, repeats: int = 2,
            device: str = "cpu", dtype: str = "float32") -> dict:
    """Tokens/s of the AR prior's sampling with and without the cache (also used by benchmarks/sample.py)."""
    overrides = {"kept_dims": kept_dims} if kept_dims else {}
    c = config_for("ar_prior", size, **overrides)
    g = torch.Generator().manual_seed(0)
    z_i = F.normalize(torch.randn(4 * c.num_buckets, c.embed_dim, generator=g), dim=-1)
    z_t = F.normalize(z_i + torch.randn(z_i.shape, generator=g), dim=-1)
    basis = fit_pca(z_i, c.kept_dims, c.num_buckets, (z_i * z_t).sum(-1), c.similarity_buckets)
    torch_dtype = getattr(torch, dtype)
    model = ARPrior(c, basis).eval().to(device, torch_dtype)
    text_emb = z_t[:batch].to(device, torch_dtype)
    states = torch.randn(batch, c.text_len, c.text_dim, generator=g).to(device, torch_dtype)

    def draw(use_cache: bool):
        return model.sample(text_emb, states, guidance_scale=guidance, generator=torch.Generator().manual_seed(1),
                            use_cache=use_cache, return_tokens=True)

    result = {"size": size, "kept_dims": c.kept_dims, "width": c.width, "layers": c.num_layers,
              "text_len": c.text_len, "batch": batch, "guidance_scale": guidance, "device": device,
              "dtype": dtype, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.machine(), "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
    tokens = {}
    for name, use_cache in (("cached", True), ("uncached", False)):
        if device != "cpu":
            draw(use_cache)  # warm-up (kernels, allocator); on CPU the timed repeats are enough
        seconds = min(timed(lambda: tokens.__setitem__(name, draw(use_cache)[1]), device) for _ in range(repeats))
        result[f"{name}_s"] = round(seconds, 3)
        result[f"{name}_tokens_per_s"] = round(batch * c.kept_dims / seconds, 1)
    result["speedup"] = round(result["uncached_s"] / result["cached_s"], 2)
    result["same_tokens"] = bool(torch.equal(tokens["cached"], tokens["uncached"]))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", help="tiny | small | base | paper")
    p.add_argument("--kept-dims", type=int, default=None, help="override the size's k (paper: 319)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=2, help="timed draws per path (the best is kept)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.size, args.kept_dims, args.batch, args.guidance, args.repeats, args.device, args.dtype), indent=2))


if __name__ == "__main__":
    main()
