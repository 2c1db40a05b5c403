"""Ingest stage throughput against bare `img2dataset.download` on the same URL list, same run.

    python benchmarks/ingest_throughput.py                   # 4000 synthetic images, 2 repeats
    python benchmarks/ingest_throughput.py --n 10000 --repeats 3

Synthetic PNGs (tasks.synth) are served over HTTP on 127.0.0.1 and listed in one Parquet URL list.
Both contenders download it into webdataset shards with the same settings (the stage's defaults
for shard size, processes, threads, image size); the stage adds its checks, the shard count check
and the summary of img2dataset's per-shard stats. Contenders alternate (and take turns going first), each into a fresh folder;
the best of --repeats is kept. Prints JSON; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tasks.http_server import serve_directory  # noqa: E402
from tasks.ingest import IngestConfig, download, summarise  # noqa: E402
from tasks.synth import generate  # noqa: E402


def bare(cfg: IngestConfig, url_list: str, out_dir: Path) -> None:
    import img2dataset

    img2dataset.download(url_list=url_list, input_format="parquet", url_col="url", caption_col="caption",
                         output_folder=str(out_dir), output_format="webdataset", image_size=cfg.image_size,
                         resize_mode=cfg.resize_mode, number_sample_per_shard=cfg.shard_size,
                         processes_count=cfg.processes, thread_count=cfg.threads, timeout=cfg.timeout_s,
                         retries=cfg.retries, distributor="multiprocessing", enable_wandb=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    cfg = IngestConfig(image_size=args.image_size, shard_size=1000, distributor="multiprocessing")  # demo.yaml's shards
    import pandas as pd

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        generate(root / "synth", args.n, seed=0, progress=False)
        with serve_directory(root / "synth") as base:
            rows = pd.read_parquet(root / "synth" / "captions.parquet")
            rows["url"] = base + "/" + rows["path"]
            url_list = root / "urls.parquet"
            rows[["url", "caption"]].to_parquet(url_list, index=False)
            best = {"stage": float("inf"), "bare": float("inf")}
            success = {}
            for r in range(args.repeats):
                for name in ("stage", "bare") if r % 2 == 0 else ("bare", "stage"):  # neither always goes first
                    out = root / f"{name}{r}"
                    out.mkdir()
                    start = time.perf_counter()
                    with contextlib.redirect_stdout(sys.stderr):  # img2dataset's progress lines; stdout is the JSON
                        if name == "stage":
                            download(cfg, str(url_list), "parquet", [], out)
                        else:
                            bare(cfg, str(url_list), out)
                    best[name] = min(best[name], time.perf_counter() - start)
                    success[name] = summarise(out)["success"]
    print(json.dumps({
        "images": args.n, "image_size": args.image_size, "processes": cfg.processes, "threads": cfg.threads,
        "shard_size": cfg.shard_size, "cpus": os.cpu_count(), "success": success,
        "stage_s": round(best["stage"], 2), "bare_img2dataset_s": round(best["bare"], 2),
        "stage_images_per_s": round(args.n / best["stage"], 1), "bare_images_per_s": round(args.n / best["bare"], 1),
        "stage_vs_bare": round(best["bare"] / best["stage"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
