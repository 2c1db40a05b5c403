"""evaluate stage: images for held-out and validation captions through the trained stack, and
what the paper measures on them (section 5), in `metrics.json`, grids, plots and an HTML report.

    rows of each split (embedding table + their real images, Ray Data)
      └─ real features: FeatureActor pool (CLIP image embeddings, + FID Inception when configured),
         cached per dataset version in real_stats/
    generation jobs (prompt x sample x mode x guidance)
      └─ StackActor pool: text → prior → decoder → upsampler (tasks.stack.load_stack, once per actor),
         plus the CLIP (and Inception) features of what it drew
    driver: metrics (tasks.metrics), the synthetic scorer (tasks.shapes), grids/plots/report (tasks.report)

Modes: `stack` is the full stack at a decoder guidance scale; `text_emb` decodes z_t directly with
the same decoder (the paper's 5.1 zero-shot baseline, `UnCLIP.sample_from_text_emb`). The guidance
sweep and the zero-shot baseline run on the first split of `splits` only (they multiply the
images to draw); the headline metrics at `decoder_guidance` run on every split.

Metric names (each under `<split>/`, e.g. `heldout/fd_clip`):
  fd_clip, fd_clip_text_emb, fd_clip_real_halves     Fréchet distance on CLIP image features: full stack,
                                                     z_t decoded directly, and two halves of the real
                                                     images (the floor for this many images)
  fd_clip_below_text_emb_share                       the share of paired bootstrap resamples of the captions in which
                                                     fd_clip < fd_clip_text_emb: near 0.5 that ordering is noise
  fid, fid_text_emb                                  the same with the FID Inception (only with inception_weights)
  clip_score, clip_score_text_emb, clip_score_real   mean cos(CLIP image embedding, caption z_t)
  diversity                                          mean pairwise CLIP distance (1 - cos) among one prompt's samples
  precision, recall                                  k-NN precision/recall (k = 3) of generated vs real CLIP image
                                                     features (tasks.metrics.precision_recall; > 3 of each needed)
  aesthetic, aesthetic_real                          the CLIP probe's mean predicted rating
  prior_cos_image, prior_cos_text                    cos(ẑ_i, z_i), cos(ẑ_i, z_t) for the prior's samples ẑ_i
  text_cos_image                                     cos(z_t, z_i): the text baseline
  prior_cos_unrelated                                cos(ẑ_i of another pair's caption, z_i)
  headline_prompts                                   with headline_prompts (first split): the captions drawn once
                                                     each for the headline metrics and the z_t baseline
  guidance_<g>/{fd_clip,fid,clip_score,diversity,precision,recall,aesthetic,one_object_*}   the guidance sweep (first split)
hf_share, hf_share_bicubic, hf_share_real: spectral power above the decoder's Nyquist of the upsampled
  output, of bicubic upsampling of the same base image, of real images; hf_gap(_bicubic): |log| ratio to real
Synthetic shapes only (scorer, images scored at >= score_size px):
  one_object_colour_acc, one_object_shape_acc, one_object_acc (both right) for one-object prompts,
  two_object_acc (both objects' colour and shape right, nothing else seen) for two-object prompts;
  with suffix _base: the decoder's output before the upsampler (bicubic to the same size);
  _text_emb: the zero-shot baseline; _real: the real images (the scorer's own error)
Sections 3-4 (first split, tasks.manipulations, at decoder_guidance): inversion_psnr; variation_consistency (synthetic
  shapes; decoded at variation_guidance)
Global: images, images_per_s, aesthetic_probe_r2, real_stats_cached (splits whose real features came from the
cache), and wall times setup_s, read_s, real_features_s, generate_s, metrics_s, outputs_s, evaluate_s.
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.context import EXECUTION_ONLY, MANIFEST, StageContext
from tasks.grids import to_uint8

REAL_STATS = "real_stats"  # the cache directory, kept when the stage is redone (pipelines.dag Stage.keep)
METRICS_FILE = "metrics.json"
BARS_FILE = "bars.json"
PROBE_FILE = "aesthetic_probe.safetensors"


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    splits: list[Literal["heldout", "validation"]] = Field(
        default_factory=lambda: ["heldout", "validation"], min_length=1,
        description="which captions to draw for; the guidance sweep and 5.1 baseline use the first")
    num_prompts: int = Field(32, ge=2, description="captions per split (the first by key)")
    samples_per_prompt: int = Field(2, ge=1, description="images per caption (diversity needs 2 or more)")
    headline_prompts: int | None = Field(
        None, ge=2, description="the first split's headline metrics, of the full stack and of z_t decoded (fd_clip, "
        "clip_score, precision/recall, the scorer's accuracies, the prior's cosines), on one image for each of this many "
        "captions, the paper's protocol: a Fréchet distance or recall against real images of many captions mostly "
        "measures how many captions the generated set covers, and an accuracy on a few captions is a coin toss. "
        "Diversity and the guidance sweep stay on num_prompts x samples_per_prompt. Default: everything on those")
    real_images: int = Field(1024, ge=4, description="real images per split for the Fréchet statistics")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="the validation split's share (as the training stages')")
    which: Literal["ema", "best"] = Field("ema", description="each training stage's final EMA or its best by validation loss")
    prior: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of prior.sample, e.g. "
                                  "{steps: 25, guidance_scale: 1.0} (diffusion) or {temperature: 1.0} (AR)")
    decoder_steps: int = Field(50, ge=1)
    decoder_guidance: float = Field(3.0, ge=0, description="the decoder guidance scale of the headline metrics")
    decoder_eta: float = Field(0.0, ge=0, description="DDIM eta of text -> image decoding: 0 deterministic, 1 as "
                               "ancestral (DDPM) sampling, which redraws noise each step and lets an under-trained "
                               "decoder correct its outlines")
    decoder_guidance_scales: list[float] = Field(default_factory=lambda: [1.0, 3.0, 5.0], min_length=1,
                                                 description="the guidance sweep (fd and aesthetic plots)")
    upsampler_steps: int = Field(15, ge=1)
    use_caption: bool = Field(True, description="give the caption to the decoder as well as z_i")
    score_size: int = Field(64, ge=16, description="the scorer reads images at least this large (it is ~75% right at 32 px)")
    inception_weights: str | None = Field(
        None, description="FID Inception-v3 weights (.safetensors, a relative path is under storage); "
        "unset: only the CLIP-feature Fréchet distance (fd_clip)")
    aesthetic_ratings: str | None = Field(
        None, description="ratings table (CSV or Parquet: image path, score; AVA's mean scores) to fit the "
        "CLIP probe on; unset on the synthetic shapes: the stand-in rating (tasks.metrics.stand_in_rating)")
    aesthetic_probe: str | None = Field(None, description="a fitted probe (.safetensors: weight, bias) instead of a table")
    aesthetic_alpha: float = Field(1.0, gt=0, description="ridge strength of the probe")
    grid_rows: int = Field(8, ge=1, le=64, description="captions per sample grid")
    manipulation_images: int = Field(8, ge=0, description="held-out images inverted and interpolated (section 3), "
                                     "at decoder_guidance (inversion included); 0: none (no variations either)")
    variation_guidance: float | None = Field(
        None, ge=0, description="decoder guidance of the eta = 1 variations, decoded from z_i alone (no caption: a "
        "weaker signal, which can take more guidance than text; the inversion stays at decoder_guidance); default: "
        "decoder_guidance. Also `unclip vary`'s default (register.sampling)")
    variation_images: int = Field(96, ge=0, description="held-out one-object images varied once each (eta 1) for "
                                  "variation_consistency (synthetic shapes); a few make it a coin toss; 0: not measured")
    inversion_steps: int = Field(100, ge=1, description="DDIM steps of the inversion and its eta = 0 reconstruction "
                                 "(the demo's decoder: 29 dB at 25 steps, 34 at 50, 44 at 100)")
    bars: list[str] = Field(default_factory=list, description="quality bars checked on the metrics, e.g. "
                            "'heldout/one_object_colour_acc >= 0.95' or 'heldout/fd_clip < heldout/fd_clip_text_emb'; "
                            "the report and bars.json say which passed")
    batch_size: int = Field(16, ge=1, description="jobs per actor call", json_schema_extra=EXECUTION_ONLY)
    actors: int | None = Field(None, ge=1, description="actor pool size (default: from the cluster)", json_schema_extra=EXECUTION_ONLY)
    cpus_per_actor: float | None = Field(None, gt=0, description="default: from the cluster", json_schema_extra=EXECUTION_ONLY)
    gpus_per_actor: float = Field(0.0, ge=0, le=8, description="GPUs per actor (0: CPU)", json_schema_extra=EXECUTION_ONLY)

    @field_validator("splits")
    @classmethod
    def _unique(cls, splits: list[str]) -> list[str]:
        if len(set(splits)) != len(splits):
            raise ValueError(f"splits are listed more than once: {splits}")
        return splits

    @field_validator("bars")
    @classmethod
    def _bars_parse(cls, bars: list[str]) -> list[str]:
        for bar in bars:
            parse_bar(bar)
        return bars

    def guidance_sweep(self) -> list[float]:
        return sorted(set(self.decoder_guidance_scales) | {self.decoder_guidance})

    def variation_scale(self) -> float:
        """The decoder guidance the variations are decoded at."""
        return self.decoder_guidance if self.variation_guidance is None else self.variation_guidance


BAR = re.compile(r"^\s*(\S+)\s*(>=|<=|>|<)\s*(\S+)\s*$")
COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def parse_bar(bar: str) -> tuple[str, str, str]:
    match = BAR.match(bar)
    if not match:
        raise ValueError(f"bar {bar!r} is not '<metric> <op> <number or metric>' with op one of >=, <=, >, <; "
                         "e.g. 'heldout/one_object_colour_acc >= 0.95'")
    return match.group(1), match.group(2), match.group(3)


def check_bars(bars: list[str], metrics: dict[str, float]) -> list[dict[str, Any]]:
    """Each bar with its value, its threshold and whether it passed (a missing metric fails, named)."""
    results = []
    for bar in bars:
        name, op, rhs = parse_bar(bar)
        try:
            threshold = float(rhs)
        except ValueError:
            threshold = metrics.get(rhs)
        value = metrics.get(name)
        passed = value is not None and threshold is not None and bool(COMPARE[op](value, threshold))
        missing = [m for m, v in ((name, value), (rhs, threshold)) if v is None]
        results.append({"bar": bar, "value": value, "threshold": threshold, "passed": passed,
                        **({"missing": missing} if missing else {})})
    return results


def resolve_path(path: str | None, storage: Path) -> Path | None:
    if path is None:
        return None
    return Path(path) if Path(path).is_absolute() else Path(storage) / path


def check_inputs(cfg: EvaluateConfig, storage: Path) -> list[str]:
    """Problems with the files the config names, before the run starts (pipelines.checks)."""
    from tasks.metrics import INCEPTION_HOWTO

    problems = []
    weights = resolve_path(cfg.inception_weights, storage)
    if weights is not None and not weights.is_file():
        problems.append(f"evaluate.inception_weights {cfg.inception_weights!r}: {weights} does not exist. {INCEPTION_HOWTO}")
    elif weights is not None and weights.suffix != ".safetensors":
        problems.append(f"evaluate.inception_weights {cfg.inception_weights!r}: not a .safetensors file (pickles are never loaded). {INCEPTION_HOWTO}")
    for key in ("aesthetic_ratings", "aesthetic_probe"):
        path = resolve_path(getattr(cfg, key), storage)
        if path is not None and not path.is_file():
            problems.append(f"evaluate.{key} {getattr(cfg, key)!r}: {path} does not exist; give an existing file "
                            "(a relative path is under storage) or leave it unset")
    return problems


# ---------------------------------------------------------------------------------------------
# Resources


def plan_pool(cfg: EvaluateConfig, cluster: dict[str, float]) -> dict[str, Any]:
    """Actor pool size, CPUs/GPUs per actor and torch threads. CPU only: one actor per 8 CPUs,
    reserving half the CPUs it stands for, so Ray Data's read tasks (0.5 CPU) always find room
    (whole-CPU actors starve them on 2 cores: STACK.md)."""
    cpus, gpus = float(cluster.get("CPU", 1.0)), float(cluster.get("GPU", 0.0))
    if cfg.gpus_per_actor > 0:
        if gpus < cfg.gpus_per_actor:
            raise ValueError(f"evaluate.gpus_per_actor={cfg.gpus_per_actor:g} but the Ray cluster has {gpus:g} GPUs; "
                             "set evaluate.gpus_per_actor: 0 to evaluate on CPUs")
        size = cfg.actors or max(1, int(gpus // cfg.gpus_per_actor))
        per_actor = cfg.cpus_per_actor or min(1.0, max(0.25, (cpus - 0.5) / (2 * size)))
        threads = max(1, int(per_actor))
    else:
        size = cfg.actors or max(1, int(cpus // 8))
        per_actor = cfg.cpus_per_actor or max(0.25, min(cpus / size / 2, 8.0))
        threads = max(1, int(cpus // size))
    return {"size": size, "num_cpus": per_actor, "num_gpus": cfg.gpus_per_actor, "threads": threads,
            "device": "cuda" if cfg.gpus_per_actor > 0 else "cpu"}


def _map_with_actors(ds, actor, pool: dict[str, Any], batch_size: int, **constructor_kwargs):
    import ray

    return ds.map_batches(actor, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=pool["size"]),
                          num_cpus=pool["num_cpus"], num_gpus=pool["num_gpus"] or None,
                          fn_constructor_kwargs={"device": pool["device"], "threads": pool["threads"], **constructor_kwargs})


# ---------------------------------------------------------------------------------------------
# Actors


def _clip_features(clip, images) -> np.ndarray:
    """CLIP image embeddings of uint8 (H, W, 3) arrays or PIL images, preprocessed as the embed stage does."""
    import torch
    from PIL import Image

    pil = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8)) for im in images]
    prepared = np.stack([clip.preprocess_uint8(im.convert("RGB")) for im in pil])
    with torch.inference_mode():
        return clip.encode_image(clip.normalize(prepared)).cpu().numpy().astype(np.float32)


def _inception_features(network, images: np.ndarray, device: str) -> np.ndarray:
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(device)
    with torch.inference_mode():
        return network(x).cpu().numpy().astype(np.float32)


class FeatureActor:
    """CLIP image features (and FID Inception features) of real images: rows with `image`
    (uint8 H, W, 3) or `path` (an image file, e.g. a ratings table's)."""

    def __init__(self, embed_dir: str, inception_weights: str | None, device: str, threads: int):
        import torch

        from tasks.metrics import inception_network
        from tasks.schema import load_embedding_clip

        torch.set_num_threads(threads)
        self.device = device
        self.clip = load_embedding_clip(embed_dir, device=device).eval()
        self.inception = inception_network(inception_weights, device) if inception_weights else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k != "image"}
        if "image" in batch:
            out["clip"] = _clip_features(self.clip, batch["image"])
            if self.inception is not None:
                out["inception"] = _inception_features(self.inception, batch["image"], self.device)
            return out
        from PIL import Image

        images = []
        for path in batch["path"]:
            with Image.open(str(path)) as im:
                images.append(im.convert("RGB"))
        out["clip"] = _clip_features(self.clip, images)
        return out


class StackActor:
    """Holds the trained stack (loaded once); turns generation jobs into images and their features.

    A batch's jobs are grouped by (mode, guidance); each group runs as one sampler call seeded by
    its first job's seed, so results are reproducible for a given config and batch size."""

    def __init__(self, storage: str, which: str, settings: dict[str, Any], inception_weights: str | None,
                 device: str, threads: int):
        import torch

        from tasks.metrics import inception_network
        from tasks.stack import load_stack

        torch.set_num_threads(threads)
        self.torch, self.device, self.settings = torch, device, settings
        self.stack = load_stack(storage, device=device, which=which)
        self.inception = inception_network(inception_weights, device) if inception_weights else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from models.unclip import Stage

        torch, s, unclip = self.torch, self.settings, self.stack.unclip
        n = len(batch["job"])
        out: dict[str, list] = {"job": [], "image": [], "base": [], "z_hat": []}
        keys = list(zip(batch["mode"], batch["guidance"]))
        for key in dict.fromkeys(keys):
            rows = [i for i in range(n) if keys[i] == key]
            mode, guidance = key
            generator = torch.Generator(device=self.device).manual_seed(int(batch["seed"][rows[0]]))
            text = unclip.encode_text([str(c) for c in batch["caption"][rows]])
            # UnCLIP.sample / sample_from_text_emb, split to keep the decoder's output before the upsamplers
            z = unclip.sample_image_emb(text, generator, **s["prior"]) if mode == "stack" else text.emb
            decoder = Stage(steps=s["decoder_steps"], eta=s["decoder_eta"], guidance_scale=float(guidance))
            base = unclip.decode(z, text if s["use_caption"] else None, decoder=decoder, generator=generator, upsample=False)
            final = unclip.upsample(base, [Stage(steps=s["upsampler_steps"])] * len(unclip.upsamplers), generator)
            out["job"] += [int(batch["job"][i]) for i in rows]
            out["image"].append(to_uint8(final))
            out["base"].append(to_uint8(base))
            out["z_hat"].append(z.float().cpu().numpy())
        result = {"job": np.asarray(out["job"], np.int64), "image": np.concatenate(out["image"]),
                  "base": np.concatenate(out["base"]), "z_hat": np.concatenate(out["z_hat"]).astype(np.float32)}
        result["clip"] = _clip_features(self.stack.clip, result["image"])
        if self.inception is not None:
            result["inception"] = _inception_features(self.inception, result["image"], self.device)
        return result


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class SplitData:
    name: str
    keys: list[str]
    captions: list[str]
    image_emb: np.ndarray  # (N, D) z_i of the real images
    text_emb: np.ndarray  # (N, D) z_t
    images: np.ndarray  # (N, S, S, 3) uint8 real images at the evaluation size
    objects: list[str] | None  # scene JSON per row (synthetic shapes), else None
    clip: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # real CLIP features
    inception: Any = None  # FeatureStats of the real images' Inception features


def scene_objects(ingest_dir: Path, shards: set[str], keys: set[str]) -> dict[str, str]:
    """key -> the scene's objects JSON (from the synth stage, carried in each sample's json)."""
    from tasks.schema import RAW_SHARD_SUFFIX, iter_tar_samples

    found = {}
    for shard in sorted(shards):
        for item in iter_tar_samples(str(Path(ingest_dir) / f"{shard}{RAW_SHARD_SUFFIX}")):
            if isinstance(item, Exception):
                break
            key, fields = item
            if key in keys and "json" in fields:
                objects = json.loads(fields["json"]).get("objects")
                if objects:
                    found[key] = objects
    return found


def read_splits(cfg: EvaluateConfig, ctx: StageContext, size: int) -> dict[str, SplitData]:
    """Rows of each split (at most real_images per split), sorted by key, with their images at
    `size` px; one Ray Data execution for all splits."""
    from tasks.dataset import embedding_dataset

    columns = ["key", "caption", "shard", "split", "image_emb", "text_emb"]
    parts = [embedding_dataset(ctx.input("embed"), split=split, val_fraction=cfg.val_fraction, columns=columns,
                               ingest_dir=ctx.input("ingest"), image_size=size).limit(cfg.real_images)
             for split in cfg.splits]
    rows = parts[0].union(*parts[1:]).take_all() if len(parts) > 1 else parts[0].take_all()
    out = {}
    for split in cfg.splits:  # a row's `split` column says heldout, or train (which validation rows are)
        mine = sorted((r for r in rows if (str(r["split"]) == "heldout") == (split == "heldout")), key=lambda r: str(r["key"]))
        if len(mine) < 4:
            raise ValueError(f"evaluate: the {split} split has {len(mine)} rows with images; at least 4 are needed "
                             f"(more data, a larger evaluate.val_fraction, or drop {split!r} from evaluate.splits)")
        keys = [str(r["key"]) for r in mine]
        objects = scene_objects(ctx.input("ingest"), {str(r["shard"]) for r in mine}, set(keys))
        out[split] = SplitData(
            split, keys, [str(r["caption"]) for r in mine],
            np.stack([r["image_emb"] for r in mine]).astype(np.float32), np.stack([r["text_emb"] for r in mine]).astype(np.float32),
            np.stack([r["image"] for r in mine]), [objects[k] for k in keys] if len(objects) == len(keys) else None)
    return out


def real_features(cfg: EvaluateConfig, ctx: StageContext, splits: list[SplitData], pool: dict, inception: Path | None) -> int:
    """Fill each split's `clip` (and `inception`) features of its real images: from the cache, or
    with one FeatureActor pool over every split that missed. A cache file is named by the dataset
    version (the embed manifest), the split's settings and the Inception weights, and checked
    against the rows' keys. Returns the number of cache hits."""
    import ray
    import torch
    from safetensors.torch import load_file, save_file

    from tasks.metrics import FeatureStats

    missing: list[tuple[SplitData, Path, dict]] = []
    for data in splits:
        path, version = real_stats_path(cfg, ctx, data, inception)
        if path.is_file():
            cached = load_file(str(path))
            data.clip = cached["clip"].numpy()
            data.inception = FeatureStats.from_tensors(cached, "inception_") if inception else None
        else:
            missing.append((data, path, version))
    if missing:
        items = [{"split": i, "row": r, "image": im} for i, (data, _, _) in enumerate(missing) for r, im in enumerate(data.images)]
        ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // cfg.batch_size)))
        rows = _map_with_actors(ds, FeatureActor, pool, cfg.batch_size, embed_dir=str(ctx.input("embed")),
                                inception_weights=str(inception) if inception else None).take_all()
        rows.sort(key=lambda r: (int(r["split"]), int(r["row"])))
        for i, (data, path, version) in enumerate(missing):
            mine = [r for r in rows if int(r["split"]) == i]
            data.clip = np.stack([r["clip"] for r in mine]).astype(np.float32)
            tensors = {"clip": torch.from_numpy(data.clip)}
            if inception:
                data.inception = FeatureStats.of(np.stack([r["inception"] for r in mine]))
                tensors.update(data.inception.tensors("inception_"))
            path.parent.mkdir(exist_ok=True)
            save_file(tensors, str(path))
            path.with_suffix(".json").write_text(json.dumps({"rows": len(mine), **version}, indent=2))
    return len(splits) - len(missing)


def real_stats_path(cfg: EvaluateConfig, ctx: StageContext, data: SplitData, inception: Path | None) -> tuple[Path, dict]:
    """The cache file of a split's real-image features, named by what they depend on."""
    embed_manifest = ctx.input("embed") / MANIFEST
    version = {
        "embed": embed_manifest.read_text() if embed_manifest.is_file() else str(ctx.input("embed")),
        "split": data.name, "val_fraction": cfg.val_fraction, "real_images": cfg.real_images,
        "size": int(data.images.shape[1]), "inception": _file_digest(inception) if inception else None,
        "keys": hashlib.sha256("\n".join(data.keys).encode()).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(version, sort_keys=True).encode()).hexdigest()[:16]
    return ctx.out_dir / REAL_STATS / f"{data.name}-{digest}.safetensors", version


def _file_digest(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


# ---------------------------------------------------------------------------------------------
# The aesthetic probe


def aesthetic_probe(cfg: EvaluateConfig, ctx: StageContext, pool: dict, synthetic: bool):
    """The CLIP probe: loaded (aesthetic_probe), fit on a ratings table (aesthetic_ratings), or on
    the synthetic training images' stand-in ratings; None when none of those is available."""
    from tasks.metrics import LinearProbe, fit_probe

    if cfg.aesthetic_probe:
        return LinearProbe.load(resolve_path(cfg.aesthetic_probe, ctx.storage))
    if cfg.aesthetic_ratings:
        features, ratings, source = _rated_table(cfg, ctx, pool)
    elif synthetic:
        features, ratings = _stand_in_ratings(ctx)
        source = "stand-in rating of the synthetic training images: 10 x shape coverage (tasks.metrics.stand_in_rating)"
    else:
        return None
    return fit_probe(features, ratings, alpha=cfg.aesthetic_alpha, seed=ctx.seed, source=source)


def _stand_in_ratings(ctx: StageContext, limit: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """CLIP image embeddings (from the embedding table) and stand-in ratings of the rows outside
    the held-out split."""
    import pyarrow.parquet as pq

    from tasks.metrics import stand_in_rating
    from tasks.schema import list_embedding_files, to_matrix

    keys, shards, features = [], set(), []
    for path in list_embedding_files(ctx.input("embed")):
        table = pq.read_table(str(path), columns=["key", "shard", "split", "image_emb"])
        keep = [i for i, s in enumerate(table["split"].to_pylist()) if s != "heldout"][: limit - len(keys)]
        if not keep:
            continue
        table = table.take(keep)
        keys += [str(k) for k in table["key"].to_pylist()]
        shards |= set(table["shard"].to_pylist())
        features.append(to_matrix(table["image_emb"], np.float32))
        if len(keys) >= limit:
            break
    objects = scene_objects(ctx.input("ingest"), shards, set(keys))
    have = [i for i, k in enumerate(keys) if k in objects]
    ratings = np.array([stand_in_rating(objects[keys[i]]) for i in have])
    return np.concatenate(features)[have], ratings


def _rated_table(cfg: EvaluateConfig, ctx: StageContext, pool: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """An AVA-style table: `image` (a local path, relative to the table's folder) and `score`."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    import ray

    path = resolve_path(cfg.aesthetic_ratings, ctx.storage)
    table = pq.read_table(str(path)) if path.suffix == ".parquet" else pacsv.read_csv(str(path))
    missing = {"image", "score"} - set(table.column_names)
    if missing:
        raise ValueError(f"evaluate.aesthetic_ratings {path}: columns {sorted(missing)} are missing "
                         f"(has {table.column_names}); it needs `image` (a local path) and `score` (the mean rating)")
    images = [str(p) for p in table["image"].to_pylist()]
    if any("://" in p for p in images):
        raise ValueError(f"evaluate.aesthetic_ratings {path}: image URLs are not fetched (nothing downloads at run time); "
                         "download the images once and list their local paths")
    paths = [p if Path(p).is_absolute() else str(path.parent / p) for p in images]
    ds = ray.data.from_items([{"row": i, "path": p} for i, p in enumerate(paths)])
    rows = sorted(_map_with_actors(ds, FeatureActor, pool, cfg.batch_size, embed_dir=str(ctx.input("embed")),
                                   inception_weights=None).take_all(), key=lambda r: int(r["row"]))
    scores = np.asarray(table["score"].to_pylist(), dtype=np.float64)
    return np.stack([r["clip"] for r in rows]), scores, f"ratings table {path}"


# ---------------------------------------------------------------------------------------------
# Generation


@dataclass
class Job:
    job: int
    split: str
    prompt: int  # row in the split's SplitData
    sample: int
    mode: str
    guidance: float
    caption: str
    seed: int


def make_jobs(cfg: EvaluateConfig, data: dict[str, SplitData], seed: int) -> list[Job]:
    """num_prompts x samples_per_prompt images per (split, mode, guidance), and on the first
    split's stack and z_t at decoder_guidance one image for each further caption up to
    headline_prompts. Ordered so that a batch holds one (mode, guidance) as far as possible."""
    plan: list[tuple[str, str, float, int]] = []
    for i, split in enumerate(cfg.splits):
        headline = max(cfg.num_prompts, cfg.headline_prompts or 0) if i == 0 else cfg.num_prompts
        plan += [(split, "stack", g, headline if g == cfg.decoder_guidance else cfg.num_prompts)
                 for g in (cfg.guidance_sweep() if i == 0 else [cfg.decoder_guidance])]
        if i == 0:
            plan.append((split, "text_emb", cfg.decoder_guidance, headline))
    jobs = []
    for split, mode, guidance, prompts in plan:
        for p in range(min(prompts, len(data[split].keys))):
            for s in range(cfg.samples_per_prompt if p < cfg.num_prompts else 1):
                n = len(jobs)
                jobs.append(Job(n, split, p, s, mode, guidance, data[split].captions[p], seed * 1_000_003 + n))
    return jobs


def generate(cfg: EvaluateConfig, ctx: StageContext, jobs: list[Job], pool: dict, inception: Path | None) -> dict[str, np.ndarray]:
    """Run every job through the StackActor pool; arrays indexed by job number."""
    import ray

    settings = {"prior": dict(cfg.prior), "decoder_steps": cfg.decoder_steps, "decoder_eta": cfg.decoder_eta,
                "upsampler_steps": cfg.upsampler_steps, "use_caption": cfg.use_caption}
    items = [{"job": j.job, "mode": j.mode, "guidance": j.guidance, "caption": j.caption, "seed": j.seed} for j in jobs]
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // cfg.batch_size)))
    rows = _map_with_actors(ds, StackActor, pool, cfg.batch_size, storage=str(ctx.storage), which=cfg.which,
                            settings=settings, inception_weights=str(inception) if inception else None).take_all()
    rows.sort(key=lambda r: int(r["job"]))
    if [int(r["job"]) for r in rows] != list(range(len(jobs))):
        raise RuntimeError(f"evaluate: {len(rows)} images came back for {len(jobs)} jobs")
    return {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "job"}


# ---------------------------------------------------------------------------------------------
# Metrics


def image_set_metrics(data: SplitData, prompts: np.ndarray, drawn: dict[str, np.ndarray], idx: np.ndarray, probe,
                      score_size: int) -> dict[str, float]:
    """The metrics of one set of generated images (rows `idx` of `drawn`, drawn for `prompts`)."""
    from tasks.metrics import PRC_NEIGHBOURS, FeatureStats, diversity, frechet_distance, mean_cosine, precision_recall, scene_accuracy

    clip = drawn["clip"][idx]
    m = {"fd_clip": frechet_distance(FeatureStats.of(data.clip), clip), "clip_score": mean_cosine(clip, data.text_emb[prompts])}
    if len(set(prompts.tolist())) < len(prompts):
        m["diversity"] = diversity(clip, prompts)
    if min(len(clip), len(data.clip)) > PRC_NEIGHBOURS:
        m.update(precision_recall(clip, data.clip))
    if probe is not None:
        m["aesthetic"] = float(probe.predict(clip).mean())
    if data.inception is not None:
        m["fid"] = frechet_distance(data.inception, drawn["inception"][idx])
    if data.objects is not None:
        objects = [data.objects[i] for i in prompts]
        m.update(scene_accuracy(drawn["image"][idx], objects, score_size))
        if drawn["base"].shape[1:] != drawn["image"].shape[1:]:
            m.update({f"{k}_base": v for k, v in scene_accuracy(drawn["base"][idx], objects, score_size).items()})
    return m


def split_metrics(cfg: EvaluateConfig, data: SplitData, jobs: list[Job], drawn: dict[str, np.ndarray], probe,
                  first: bool, score_size: int) -> dict[str, float]:
    """The headline metrics (full stack at decoder_guidance), the prior's, the real images'
    references and, on the first split, the z_t baseline (suffix _text_emb) and the sweep; the
    first split's headline and z_t on one image per caption when headline_prompts is set."""
    from tasks.metrics import fd_order_share, frechet_distance, mean_cosine, scene_accuracy

    def image_set(mode: str, guidance: float, one_per_caption: int | None = None) -> tuple[np.ndarray, dict[str, float]]:
        """num_prompts x samples_per_prompt images, or sample 0 of the first one_per_caption captions"""
        idx = np.array([j.job for j in jobs if j.split == data.name and j.mode == mode and j.guidance == guidance
                        and (j.prompt < cfg.num_prompts if one_per_caption is None else j.prompt < one_per_caption and j.sample == 0)],
                       np.int64)
        prompts = np.array([jobs[i].prompt for i in idx])
        return idx, image_set_metrics(data, prompts, drawn, idx, probe, score_size)

    one_each = cfg.headline_prompts if first else None
    main, m = image_set("stack", cfg.decoder_guidance)
    sweep_entry = dict(m)  # the guidance sweep's at decoder_guidance, on num_prompts x samples_per_prompt
    if one_each is not None:
        main, m = image_set("stack", cfg.decoder_guidance, one_each)
        if "diversity" in sweep_entry:  # takes several samples of a caption
            m["diversity"] = sweep_entry["diversity"]
        m["headline_prompts"] = float(len(main))
    half = len(data.clip) // 2
    m["fd_clip_real_halves"] = frechet_distance(data.clip[:half], data.clip[half:])
    m["clip_score_real"] = mean_cosine(data.clip, data.text_emb)
    if probe is not None:
        m["aesthetic_real"] = float(probe.predict(data.clip).mean())
    if data.objects is not None:
        m.update({f"{k}_real": v for k, v in scene_accuracy(data.images, data.objects, score_size).items()})
        counts = [len(json.loads(data.objects[jobs[i].prompt])) for i in main if jobs[i].sample == 0]
        m["one_object_prompts"], m["two_object_prompts"] = float(counts.count(1)), float(counts.count(2))

    # the prior on held-out pairs: one sample per prompt
    first_sample = main[[jobs[i].sample == 0 for i in main]]
    z_hat, q = drawn["z_hat"][first_sample], np.array([jobs[i].prompt for i in first_sample])
    m["prior_cos_image"] = mean_cosine(z_hat, data.image_emb[q])
    m["prior_cos_text"] = mean_cosine(z_hat, data.text_emb[q])
    m["text_cos_image"] = mean_cosine(data.text_emb[q], data.image_emb[q])
    m["prior_cos_unrelated"] = mean_cosine(np.roll(z_hat, 1, axis=0), data.image_emb[q])

    base, final = drawn["base"][main], drawn["image"][main]
    if base.shape[1] < final.shape[1]:  # the upsamplers' added detail, against bicubic of the same base image
        from tasks.metrics import bicubic_to, high_frequency_share

        cutoff = 0.5 * base.shape[1] / final.shape[1]
        m["hf_share"] = high_frequency_share(final, cutoff)
        m["hf_share_bicubic"] = high_frequency_share(bicubic_to(base, final.shape[1]), cutoff)
        m["hf_share_real"] = high_frequency_share(data.images, cutoff)
        # how far each is from the real images' share, in log ratio: the upsampler should be closer
        m["hf_gap"] = abs(float(np.log(max(m["hf_share"], 1e-12) / max(m["hf_share_real"], 1e-12))))
        m["hf_gap_bicubic"] = abs(float(np.log(max(m["hf_share_bicubic"], 1e-12) / max(m["hf_share_real"], 1e-12))))

    if first:
        text_idx, zero_shot = image_set("text_emb", cfg.decoder_guidance, one_each)
        m.update({f"{k}_text_emb": v for k, v in zero_shot.items()
                  if k in ("fd_clip", "fid", "clip_score") or k.endswith("_acc")})
        # how sure the 5.1 ordering is: the two sets' images were drawn for the same captions, in the same order
        m["fd_clip_below_text_emb_share"] = fd_order_share(data.clip, drawn["clip"][main], drawn["clip"][text_idx])
        for g in cfg.guidance_sweep():  # every scale on the same num_prompts x samples_per_prompt images
            swept = sweep_entry if g == cfg.decoder_guidance else image_set("stack", g)[1]
            m.update({f"guidance_{g:g}/{k}": v for k, v in swept.items()
                      if k in ("fd_clip", "fid", "clip_score", "diversity", "precision", "recall", "aesthetic")
                      or k.startswith("one_object_")})
    return m


# ---------------------------------------------------------------------------------------------
# Outputs


def write_grids(cfg: EvaluateConfig, data: SplitData, jobs: list[Job], drawn: dict[str, np.ndarray], first: bool,
                out_dir: Path) -> list[Path]:
    """Per split (and per prompt type on the synthetic shapes): real image | samples at the
    headline guidance | z_t decoded directly (first split), the caption under each row."""
    from tasks.report import sample_grid, to_png

    by_prompt: dict[int, dict[str, list]] = {}
    for j in jobs:
        if j.split != data.name or j.prompt >= cfg.num_prompts:  # those beyond: headline_prompts' one image each
            continue
        if j.mode == "stack" and j.guidance == cfg.decoder_guidance:
            by_prompt.setdefault(j.prompt, {"stack": [], "text_emb": []})["stack"].append(drawn["image"][j.job])
        elif j.mode == "text_emb":
            by_prompt.setdefault(j.prompt, {"stack": [], "text_emb": []})["text_emb"].append(drawn["image"][j.job])
    groups: dict[str, list[int]] = {}
    for p in sorted(by_prompt):
        kind = "all"
        if data.objects is not None:
            kind = {1: "one_object", 2: "two_object"}.get(len(json.loads(data.objects[p])), "other")
        groups.setdefault(kind, []).append(p)
    titles = ["real"] + [f"sample {i + 1}" for i in range(cfg.samples_per_prompt)] + (["z_t decoded"] if first else [])
    paths = []
    for kind, prompts in groups.items():
        rows = [(data.captions[p], [data.images[p], *by_prompt[p]["stack"], *by_prompt[p]["text_emb"][:1]])
                for p in prompts[: cfg.grid_rows]]
        paths.append(to_png(sample_grid(rows, titles), out_dir / "grids" / f"{data.name}_{kind}.png"))
    return paths


def sweep_rows(cfg: EvaluateConfig, metrics: dict[str, float]) -> list[dict[str, float]]:
    split = cfg.splits[0]
    rows = []
    for g in cfg.guidance_sweep():
        tag = f"{split}/guidance_{g:g}/"
        row = {"guidance": g, **{k[len(tag):]: v for k, v in metrics.items() if k.startswith(tag)}}
        row.setdefault("aesthetic", float("nan"))
        row.setdefault("diversity", float("nan"))
        rows.append(row)
    return rows


def manipulate(cfg: EvaluateConfig, ctx: StageContext, data: SplitData, score_size: int,
               out_dir: Path) -> tuple[dict[str, float], list[Path]]:
    """Section 3-4 strips and checks (tasks.manipulations) on the first split's real images, on the driver."""
    from tasks import manipulations
    from tasks.stack import load_stack

    stack = load_stack(ctx.storage, which=cfg.which)
    n = min(cfg.manipulation_images, len(data.keys))
    settings = manipulations.Settings(steps=cfg.decoder_steps, inversion_steps=cfg.inversion_steps,
                                      upsampler_steps=cfg.upsampler_steps, images=max(n, 2), guidance=cfg.decoder_guidance,
                                      variation_images=min(cfg.variation_images, len(data.keys)),
                                      variation_guidance=cfg.variation_scale())
    return manipulations.run(stack, data.images, data.image_emb, data.captions, data.objects, settings,
                             out_dir / "manipulations", score_size)


def stage_seconds(storage: Path) -> dict[str, float]:
    """Wall time of each finished stage of the run, in the order they ran (from the manifests the
    runner writes last in each stage's directory)."""
    found = []
    for path in Path(storage).glob(f"*/{MANIFEST}"):
        manifest = json.loads(path.read_text())
        if "duration_s" in manifest:
            found.append((manifest.get("started_at", ""), manifest.get("stage", path.parent.name), float(manifest["duration_s"])))
    return {stage: seconds for _, stage, seconds in sorted(found)}


def output_size(storage: Path, which: str) -> int:
    from models import checkpoint
    from tasks.stack import stack_parts

    parts = stack_parts(storage, which)
    _, config = checkpoint.read_config(parts["upsampler2"] or parts["upsampler"] or parts["decoder"])
    return int(config["image_size"])


def run(cfg: EvaluateConfig, ctx: StageContext) -> dict[str, float]:
    import mlflow
    import ray

    from tasks.report import guidance_plots, html_report

    started = clock = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(name: str) -> None:  # wall time of each phase, reported with the metrics
        nonlocal clock
        seconds[f"{name}_s"] = time.perf_counter() - clock
        clock = time.perf_counter()

    ray.data.DataContext.get_current().enable_progress_bars = ctx.show_progress
    out_dir = Path(ctx.out_dir)
    inception = resolve_path(cfg.inception_weights, ctx.storage)
    if inception is not None:
        from tasks.metrics import inception_network

        inception_network(inception)  # a missing or wrong file fails here, not in an actor
        ctx.share_with_workers(inception)
    size = output_size(ctx.storage, cfg.which)
    score_size = max(cfg.score_size, size)
    pool = plan_pool(cfg, ray.cluster_resources())
    lap("setup")

    data = read_splits(cfg, ctx, size)
    synthetic = all(d.objects is not None for d in data.values())
    lap("read")
    cache_hits = real_features(cfg, ctx, list(data.values()), pool, inception)
    probe = aesthetic_probe(cfg, ctx, pool, synthetic)
    if probe is not None:
        probe.save(out_dir / PROBE_FILE)
    lap("real_features")

    jobs = make_jobs(cfg, data, ctx.seed)
    drawn = generate(cfg, ctx, jobs, pool, inception)
    lap("generate")

    metrics: dict[str, float] = {}
    for i, split in enumerate(cfg.splits):
        split_values = split_metrics(cfg, data[split], jobs, drawn, probe, i == 0, score_size)
        metrics.update({f"{split}/{k}": v for k, v in split_values.items()})
    metrics.update(images=float(len(jobs)), images_per_s=len(jobs) / max(seconds["generate_s"], 1e-9),
                   real_stats_cached=float(cache_hits))
    if probe is not None:
        metrics["aesthetic_probe_r2"] = probe.r2
    strips: list[Path] = []
    if cfg.manipulation_images > 0:
        manipulated, strips = manipulate(cfg, ctx, data[cfg.splits[0]], score_size, out_dir)
        metrics.update({f"{cfg.splits[0]}/{k}": v for k, v in manipulated.items()})
    metrics = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
    bars = check_bars(cfg.bars, metrics)
    lap("metrics")

    grids = [p for i, s in enumerate(cfg.splits) for p in write_grids(cfg, data[s], jobs, drawn, i == 0, out_dir)]
    plots = guidance_plots(sweep_rows(cfg, metrics), out_dir)
    notes = [
        f"{len(jobs)} images: {cfg.num_prompts} captions per split ({', '.join(cfg.splits)}) x {cfg.samples_per_prompt} samples; "
        f"decoder guidance {cfg.decoder_guidance:g} ({cfg.decoder_steps} steps, eta {cfg.decoder_eta:g}), sweep {cfg.guidance_sweep()} and the "
        f"z_t-decoded baseline on {cfg.splits[0]}; output {size} px, scored at {score_size} px.",
        *([f"The headline metrics and the z_t baseline on {cfg.splits[0]}: one image for each of "
           f"{int(metrics[f'{cfg.splits[0]}/headline_prompts'])} captions (the paper's protocol); diversity and the "
           f"guidance sweep on {cfg.num_prompts} captions x {cfg.samples_per_prompt} samples."] if cfg.headline_prompts else []),
        *([f"Sections 3-4 (variations, interpolation, text diff, PCA probe) on {cfg.splits[0]} images: decoder guidance "
           f"{cfg.decoder_guidance:g}, inversion included"
           + ("." if cfg.variation_guidance is None else f"; the eta = 1 variations decoded at {cfg.variation_guidance:g}.")]
          if cfg.manipulation_images > 0 else []),
        "fd_clip is a Fréchet distance on CLIP image features (not FID, whose features are Inception's); "
        "fd_clip_real_halves is its value between two halves of the real images: the floor at this sample size.",
        f"Aesthetic probe: {probe.source}; R² on held-out ratings {probe.r2:.3f}." if probe is not None else
        "No aesthetic probe (set evaluate.aesthetic_ratings or evaluate.aesthetic_probe).",
    ]
    (out_dir / BARS_FILE).write_text(json.dumps(bars, indent=2))
    report = html_report(out_dir / "report.html", f"unCLIP evaluation: {ctx.storage}", metrics, notes,
                         [("Samples (caption under each row)", grids),
                          ("Variations, interpolation, text diff, PCA probe (sections 3-4)", strips),
                          ("Guidance sweep", plots)],
                         bars=bars, stage_seconds=stage_seconds(ctx.storage))
    lap("outputs")
    metrics.update(seconds, evaluate_s=time.perf_counter() - started)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    if mlflow.active_run() is not None:
        probe_files = [out_dir / PROBE_FILE, (out_dir / PROBE_FILE).with_suffix(".json")] if probe else []
        for path in [out_dir / METRICS_FILE, out_dir / BARS_FILE, report, *plots, *probe_files]:
            mlflow.log_artifact(str(path))
        for path in grids:
            mlflow.log_artifact(str(path), artifact_path="grids")
        for path in strips:
            mlflow.log_artifact(str(path), artifact_path="manipulations")
    return metrics
