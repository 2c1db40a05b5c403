"""Training-stage throughput: the pipeline's loop (Ray Train + Ray Data) against a plain
single-process loop over the same data, model, batch and objective, in the same run.

    .venv/bin/python benchmarks/train_stage.py [--kinds prior decoder] [--steps 60] [--rows 1024]

Prints one JSON document: per kind, samples/s of the plain loop (the same torch threads as the
stage's one worker, and the same EMA and schedule), of the stage with 1 worker and
with 2 workers (steady state, from the loop's own samples/s metric), their ratio, and the stage's
start-up (wall time minus steps at the steady rate). Data: synthetic shards embedded by the real
embed stage (tiny CLIP). Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                   "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(key, value)

import mlflow  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from tasks import train_decoder, train_prior  # noqa: E402
from tasks.context import StageContext  # noqa: E402
from tasks.training import torch_threads, worker_resources  # noqa: E402

STAGES = {"prior": (train_prior, train_prior.TrainPriorConfig), "decoder": (train_decoder, train_decoder.TrainDecoderConfig)}


def write_shards(directory: Path, rows: int, per_shard: int = 256) -> None:
    """img2dataset-style tar shards of synthetic shapes (jpg + txt + json)."""
    import io
    import random
    import tarfile

    from tasks.shapes import render, sample_scene, split_of

    directory.mkdir(parents=True)
    rng = random.Random(0)
    for shard in range(max(1, rows // per_shard)):
        with tarfile.open(directory / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                objects, caption = sample_scene(rng, 0.4)
                buf = io.BytesIO()
                render(objects, 32).save(buf, format="JPEG", quality=90)
                key = f"{shard:05d}{i:04d}"
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()),
                                  ("json", json.dumps({"key": key, "split": split_of(objects)}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def make_inputs(root: Path, rows: int) -> tuple[Path, Path]:
    from tasks.embed import EmbedConfig, run

    ingest, embed = root / "ingest", root / "embed"
    embed.mkdir(parents=True)
    write_shards(ingest, rows)
    run(EmbedConfig(clip_arch="tiny", clip_pretrained=None, batch_size=128),
        StageContext("embed", root, embed, {"ingest": ingest}, seed=0, show_progress=False))
    return ingest, embed


def plain_loop(kind: str, cfg, ingest: Path, embed: Path, steps: int, threads: int) -> float:
    """Same model, batches, objective, optimizer, schedule, EMA and torch threads as the stage's
    one worker, in one process; data read once into memory."""
    from models import sizes
    from models.training_state import EMA, warmup_cosine
    from tasks.dataset import embedding_dataset

    module = STAGES[kind][0]
    config = module.model_config(cfg, embed)
    kwargs = dict(columns=["image_emb", "text_emb", "text_tokens"])
    if kind == "decoder":
        kwargs.update(ingest_dir=ingest, image_size=config["image_size"])
    rows = embedding_dataset(embed, split="train", **kwargs).take_all()
    columns = {k: torch.as_tensor(__import__("numpy").stack([r[k] for r in rows])) for k in rows[0]}
    batches = module.PriorBatches("cpu", str(embed)) if kind == "prior" else \
        module.DecoderBatches("cpu", str(embed), cfg.use_captions)
    network = sizes.build_from_config(kind, config)
    optimizer = torch.optim.AdamW(network.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps, fused=True)
    schedule = warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    ema = EMA(network, decay=cfg.ema_decay, warmup=cfg.ema_warmup)
    objective = sizes.objective(kind)
    n, b = len(rows), cfg.batch_size
    torch.set_num_threads(threads)

    def step(i):
        idx = torch.arange(i * b, (i + 1) * b) % n
        loss, _ = objective(network, batches({k: v[idx] for k, v in columns.items()}), None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        ema.update(network)
        optimizer.zero_grad(set_to_none=True)
        schedule.step()

    for i in range(3):
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * b / (time.perf_counter() - start)


def stage_loop(kind: str, cfg, ingest: Path, embed: Path, root: Path, workers: int) -> dict:
    module = STAGES[kind][0]
    out = root / f"{kind}_{workers}"
    out.mkdir()
    cfg = cfg.model_copy(update={"workers": workers, "val_fraction": 0.0, "log_every": max(1, cfg.steps // 3)})
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    mlflow.set_experiment("bench")
    ctx = StageContext(f"train_{kind}", root, out, {"embed": embed, "ingest": ingest}, seed=0, show_progress=False)
    with mlflow.start_run() as run:
        start = time.perf_counter()
        module.run(cfg, ctx)
        wall = time.perf_counter() - start
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "samples_per_s")
    rate = sorted(history, key=lambda m: m.step)[-1].value  # steady state: the last window
    return {"samples_per_s": rate, "wall_s": wall, "startup_s": wall - cfg.steps * cfg.batch_size / rate}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kinds", nargs="+", default=["prior", "decoder"], choices=sorted(STAGES))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rows", type=int, default=1024)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=512 * 2**20,
                 _temp_dir=str(root / "ray"), log_to_driver=False)
        ingest, embed = make_inputs(root, args.rows)
        for kind in args.kinds:
            module, config_class = STAGES[kind]
            cfg = config_class(steps=args.steps, batch_size=64 if kind == "prior" else 16, warmup_steps=0,
                               checkpoint_every=args.steps, torch_threads=1 if kind == "prior" else None)  # as demo.yaml
            one_worker = cfg.model_copy(update={"workers": 1})
            threads = torch_threads(one_worker, worker_resources(one_worker, ray.cluster_resources()), ray.cluster_resources())
            plain = plain_loop(kind, cfg, ingest, embed, args.steps, threads)
            one = stage_loop(kind, cfg, ingest, embed, root, 1)
            two = stage_loop(kind, cfg, ingest, embed, root, 2)
            results[kind] = {"torch_threads": threads, "plain_samples_per_s": plain, "stage_1_worker": one, "stage_2_workers": two,
                             "ratio_1_worker_vs_plain": one["samples_per_s"] / plain,
                             "ratio_2_vs_1_workers": two["samples_per_s"] / one["samples_per_s"]}
        ray.shutdown()
    print(json.dumps({"steps": args.steps, "rows": args.rows, "cpus": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
