"""Full-stack sampling speed (images/s: prior + decoder + upsampler) of our stack against diffusers'
UnCLIPPipeline on the same weights and steps, in the same process; and the AR prior's tokens/s with
and without its key/value cache (benchmarks/ar_prior_cache.py). Prints JSON.

    python benchmarks/sample.py                                   # tiny stack, batch 4
    python benchmarks/sample.py --size small --threads 1          # the demo's sizes, on a busy machine
    python benchmarks/sample.py --size small --device cuda --batch 16

Random-init networks of the named sizes (the prior's and decoder's CLIP widths made equal, the
upsampler's input size the decoder's output, a learned-variance decoder, as the pipeline requires), exported to diffusers'
format (models.diffusers_export) and loaded back into UnCLIPPipeline with a random one-layer
transformers CLIP text model (the pipeline encodes "" for its unconditional branch). Both sides
run the same steps per stage with the same guidance (classifier-free in prior and decoder, none
in the upsampler) and DDPM (--sampler: ours may also run "ddim"; the pipeline's UnCLIPScheduler
is DDPM only). Ours uses the same null condition as the pipeline (the encoding of "") and one
prior draw (candidates=1), so the work per image is the same. Captions are full length (no
padding). Contenders are timed interleaved, the best of --repeats kept. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks import ar_prior_cache  # noqa: E402
from benchmarks.ar_prior_cache import timed  # noqa: E402
from models import decoder as dec  # noqa: E402
from models import prior as prior_mod  # noqa: E402
from models import upsampler as ups  # noqa: E402
from models.diffusers_export import unclip_components  # noqa: E402
from models.unclip import Stage, TextCondition, UnCLIP  # noqa: E402
from tests.model_helpers import perturb, random_clip_text  # noqa: E402


def stack_configs(size: str):
    """(prior, decoder, upsampler) configs of a named size that the pipeline can hold."""
    p, d, u = prior_mod.SIZES[size], dec.SIZES[size], ups.SIZES[size]
    width = d.embed_dim
    p = dataclasses.replace(p, embed_dim=width, text_dim=width, normalize=False)
    d = dataclasses.replace(d, text_dim=width, learned_variance=True)  # the pipeline's guidance splits off a variance
    u = dataclasses.replace(u, low_res_size=d.image_size, image_size=d.image_size * u.image_size // u.low_res_size)  # the size's ratio
    return p, d, u


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", help="tiny | small (models' named sizes)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prior-steps", type=int, default=25)
    p.add_argument("--decoder-steps", type=int, default=25)
    p.add_argument("--upsampler-steps", type=int, default=7)
    p.add_argument("--prior-guidance", type=float, default=4.0)
    p.add_argument("--decoder-guidance", type=float, default=8.0)
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"], help="ours (the pipeline: always DDPM)")
    p.add_argument("--repeats", type=int, default=2, help="timed draws per contender (the best is kept)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--ar-size", default="small", help="AR prior size for the cache benchmark; 'none' to skip")
    p.add_argument("--ar-batch", type=int, default=4)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import UnCLIPPipeline  # needs transformers (the test extra)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the pipeline's deprecation notice
    device = torch.device(args.device)

    prior_cfg, decoder_cfg, upsampler_cfg = stack_configs(args.size)
    tokenizer, text_model, encode = random_clip_text(decoder_cfg.embed_dim, prior_cfg.text_len)
    torch.manual_seed(0)
    prior = perturb(prior_mod.DiffusionPrior(prior_cfg), scale=0.02).eval()
    decoder = perturb(dec.Decoder(decoder_cfg), scale=0.02).eval()
    upsampler = perturb(ups.Upsampler(upsampler_cfg), scale=0.02).eval()
    stack = UnCLIP(decoder, prior, [upsampler], text_encoder=encode)
    stack.use_empty_caption_as_null()  # the pipeline's unconditional branch, so both do the same work
    pipe = UnCLIPPipeline(text_encoder=text_model, tokenizer=tokenizer, **unclip_components(prior, decoder, upsampler))
    pipe.set_progress_bar_config(disable=True)
    for module in (prior, decoder, upsampler):
        module.to(device)
    pipe.to(device)
    text_model.to(device)

    g = torch.Generator().manual_seed(1)
    width, n = decoder_cfg.embed_dim, prior_cfg.text_len
    captions = TextCondition(torch.randn(args.batch, width, generator=g).to(device),
                             torch.randn(args.batch, n, width, generator=g).to(device),
                             torch.ones(args.batch, n, dtype=torch.bool, device=device))

    def ours():
        return stack.sample(captions, generator=torch.Generator().manual_seed(0),
                            prior=dict(steps=args.prior_steps, sampler=args.sampler, guidance_scale=args.prior_guidance, candidates=1),
                            decoder=Stage(steps=args.decoder_steps, sampler=args.sampler, guidance_scale=args.decoder_guidance),
                            upsamplers=[Stage(steps=args.upsampler_steps, sampler=args.sampler)])

    def theirs():
        return pipe(text_model_output=(captions.emb, captions.states), text_attention_mask=captions.mask,
                    prior_num_inference_steps=args.prior_steps, decoder_num_inference_steps=args.decoder_steps,
                    super_res_num_inference_steps=args.upsampler_steps, prior_guidance_scale=args.prior_guidance,
                    decoder_guidance_scale=args.decoder_guidance, generator=torch.Generator().manual_seed(0), output_type="pt")

    result = {
        "size": args.size, "batch": args.batch, "device": args.device, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(), "sampler_ours": args.sampler,
        "steps": {"prior": args.prior_steps, "decoder": args.decoder_steps, "upsampler": args.upsampler_steps},
        "guidance": {"prior": args.prior_guidance, "decoder": args.decoder_guidance},
        "params_m": {"prior": round(n_params(prior) / 1e6, 2), "decoder": round(n_params(decoder) / 1e6, 2),
                     "upsampler": round(n_params(upsampler) / 1e6, 2)},
        "image_size": {"decoder": decoder_cfg.image_size, "upsampler": upsampler_cfg.image_size},
    }
    with torch.no_grad():
        if args.device != "cpu":
            ours(), theirs()  # warm-up (kernels, allocator); on CPU the timed repeats are enough
        times = {"ours": [], "diffusers": []}
        for _ in range(args.repeats):  # interleaved: load from other processes hits both
            times["ours"].append(timed(ours, args.device))
            times["diffusers"].append(timed(theirs, args.device))
    for name, values in times.items():
        result[f"{name}_s"] = round(min(values), 3)
        result[f"{name}_images_per_s"] = round(args.batch / min(values), 3)
    result["speedup_vs_diffusers"] = round(min(times["diffusers"]) / min(times["ours"]), 2)
    if args.ar_size != "none":
        result["ar_prior"] = ar_prior_cache.measure(args.ar_size, batch=args.ar_batch, repeats=1, device=args.device)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
