"""Embed stage throughput vs a plain single-process loop, and peak memory at two dataset sizes.

    python benchmarks/embed_throughput.py                       # ViT-B-32 (random init, 224 px), 1k and 10k
    python benchmarks/embed_throughput.py --sizes 1000 4000 --model ViT-B-32 --batch-size 64

Prints one JSON object. Each measurement runs in a fresh subprocess so that its peak memory (RSS and
PSS summed over the driver and every process it starts, Ray's included, sampled every 2 s from
/proc) belongs to that measurement alone. The plain loop reads the same tar shards with tarfile + PIL, applies
open_clip's preprocessing and encodes with the same model and batch size, one batch after another.
The model's random-init weights are written to a local .safetensors file before any timing, and every
contender loads that file, as a user's run loads its CLIP weights.
samples/s counts from the start of the stage's `run` (or the loop) to its end, weight loading included;
Ray's own start-up (`ray.init`) is reported apart.

The driver's own memory is reported apart (`driver_peak_rss_mb`: the driver process's peak RSS,
from getrusage, and `driver_rss_before_run_mb`, its RSS once Ray, torch and open_clip are imported):
the stage's workers write the Parquet files, so the driver holds no embeddings and its peak should not
grow with the data (`driver_peak_rss_growth` between the first and last size, target <= 10%), nor
should throughput drop (`stage_throughput_ratio`, last size over first; `steady_throughput_ratio`
the same after the first output, which leaves out the start-up that dominates a small run).

Two loops are timed: `loop` encodes text with open_clip's `encode_text` (all context positions), and
`loop_cut_text` with the stage's text encoder (`models.clip.ClipEncoder.encode_text`, which stops at
the batch's last end token). `stage_vs_loop` is the stage against the plain loop; `stage_vs_loop_cut_text`
isolates what the pipeline itself (decode overlapped with encoding, minus its start-up) adds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
}


# --- data -----------------------------------------------------------------------------------------
def write_shards(directory: Path, n: int, per_shard: int, size: int) -> None:
    """img2dataset-style shards of textured JPEGs (noise + shapes: realistic decode cost)."""
    import numpy as np
    from PIL import Image, ImageDraw

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = [Image.fromarray((rng.normal(128, 40, (size, size, 3)).clip(0, 255)).astype(np.uint8)) for _ in range(8)]
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    for shard in range((n + per_shard - 1) // per_shard):
        with tarfile.open(directory / f"{shard:05d}.tar", "w") as tar:
            for i in range(min(per_shard, n - shard * per_shard)):
                index = shard * per_shard + i
                image = base[index % 8].copy()
                draw = ImageDraw.Draw(image)
                c = int(rng.integers(size // 4, 3 * size // 4))
                draw.ellipse([c - size // 6, c - size // 6, c + size // 6, c + size // 6],
                             fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=90)
                key = f"{shard:05d}{i:04d}"
                caption = f"a {colours[index % 6]} circle on a noisy background number {index}"
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()),
                                  ("json", json.dumps({"key": key, "split": "train"}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


# --- memory ---------------------------------------------------------------------------------------
def _tree_memory(root: int) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) over `root` and all its descendants, in bytes, from /proc. RSS counts
    shared pages (torch's libraries, Ray's shared-memory object store) once per process; PSS splits
    them between the processes that share them, so its sum is the memory the run really uses."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    rss = pss = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, pss


def measure(cmd: list[str], env: dict) -> tuple[dict, dict]:
    """Run a measurement subprocess; (its JSON result, {"peak_rss_mb", "peak_pss_mb"} of its process tree)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    peak = [0, 0]
    done = threading.Event()

    def sample():
        # every 2 s: reading smaps_rollup walks a process's page tables (~75 ms of CPU for a 2 GB
        # process), so sampling every 0.2 s took a quarter of a core from the contenders
        while not done.wait(2.0):
            rss, pss = _tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1]), {"peak_rss_mb": round(peak[0] / 2**20), "peak_pss_mb": round(peak[1] / 2**20)}


# --- the two contenders (run inside the subprocess) -----------------------------------------------
def write_weights(path: Path, model: str, arch: str | None) -> None:
    """Random-init CLIP weights (seed 0) as the local file every contender loads."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    if arch == "tiny":
        from models.clip import TINY_CLIP_ARCH

        clip = open_clip.CLIP(**TINY_CLIP_ARCH)
    else:
        clip = open_clip.create_model(model, pretrained=None)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))


def run_stage(shards: Path, out: Path, model: str, weights: str, batch_size: int, threads: int | None,
              arch: str | None) -> dict:
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             object_store_memory=512 * 2**20, _temp_dir=tempfile.mkdtemp(prefix="rb", dir="/tmp"))
    t_init = time.perf_counter() - t0
    import open_clip  # noqa: F401 - imported before the clock starts, as in the loop
    import torch  # noqa: F401

    from tasks.context import StageContext
    from tasks.embed import EmbedConfig, run

    cfg = EmbedConfig(clip_model=model, clip_pretrained=weights, clip_arch=arch, batch_size=batch_size, torch_threads=threads)
    out.mkdir(parents=True, exist_ok=True)
    with open("/proc/self/statm") as f:
        rss_before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    t0 = time.perf_counter()
    counts = run(cfg, StageContext("embed", out.parent, out, {"ingest": shards}, seed=0, show_progress=False))
    seconds = time.perf_counter() - t0
    driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    ray.shutdown()
    first = counts.get("first_output_seconds")
    return {"samples": counts["rows_read"], "seconds": seconds, "samples_per_s": counts["rows_read"] / seconds,
            # once the pipeline is up (actors started, first shard written): start-up weighs less at 10k than at 1k
            "samples_per_s_after_first_output": counts["rows_read"] / (seconds - first) if first else None,
            "ray_init_seconds": t_init, "first_output_seconds": counts.get("first_output_seconds"),
            "plan_torch_threads": counts.get("plan_torch_threads"),
            "driver_rss_before_run_mb": round(rss_before / 2**20), "driver_peak_rss_mb": round(driver_peak / 2**20)}


def run_loop(shards: Path, model: str, weights: str, batch_size: int, arch: str | None, cut_text: bool) -> dict:
    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    t0 = time.perf_counter()
    if arch == "tiny":
        from models.clip import TINY_CLIP_ARCH

        clip = open_clip.CLIP(**TINY_CLIP_ARCH).eval()
        open_clip.load_checkpoint(clip, weights)
        transform = open_clip.image_transform(clip.visual.image_size, is_train=False)
        tokenizer = open_clip.SimpleTokenizer(context_length=clip.context_length)
    else:
        clip = open_clip.create_model(model, pretrained=weights, weights_only=True).eval()
        cfg = clip.visual.preprocess_cfg
        transform = open_clip.image_transform(cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"])
        tokenizer = open_clip.get_tokenizer(model)
    encode_text = clip.encode_text
    if cut_text:  # the same weights through the stage's text encoder
        from models.clip import TINY_CLIP_ARCH, load_clip

        encode_text = load_clip(model, weights, arch=TINY_CLIP_ARCH if arch == "tiny" else None).encode_text
    n = 0
    out = []

    def encode(images, captions):
        with torch.inference_mode():
            z_i = torch.nn.functional.normalize(clip.encode_image(torch.stack(images)), dim=-1)
            z_t = torch.nn.functional.normalize(encode_text(tokenizer(captions)), dim=-1)
        out.append(((z_i * z_t).sum(-1).numpy(), z_i.half().numpy(), z_t.half().numpy()))

    images, captions = [], []
    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            fields: dict[str, dict] = {}
            for member in tar:
                key, ext = member.name.split(".", 1)
                fields.setdefault(key, {})[ext] = tar.extractfile(member).read()
            for key, f in fields.items():
                images.append(transform(Image.open(io.BytesIO(f["jpg"]))))
                captions.append(f["txt"].decode())
                n += 1
                if len(images) == batch_size:
                    encode(images, captions)
                    images, captions = [], []
    if images:
        encode(images, captions)
    seconds = time.perf_counter() - t0
    assert sum(len(o[0]) for o in out) == n and np.isfinite(out[0][1]).all()
    return {"samples": n, "seconds": seconds, "samples_per_s": n / seconds, "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--arch", default=None, choices=["tiny"], help="use models.clip.TINY_CLIP_ARCH instead of --model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--image-size", type=int, default=256, help="stored JPEG size (img2dataset image_size)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the encoder actor (default: planned)")
    parser.add_argument("--loop-sizes", type=int, nargs="*", default=None,
                        help="sizes at which to also time the plain loop (default: the first size)")
    parser.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        kind, shards, out, weights = args._child[0], Path(args._child[1]), Path(args._child[2]), args._child[3]
        if kind == "stage":
            result = run_stage(shards, out, args.model, weights, args.batch_size, args.threads, args.arch)
        else:
            result = run_loop(shards, args.model, weights, args.batch_size, args.arch, cut_text=kind == "loop_cut_text")
        print(json.dumps(result))
        return

    env = {**os.environ, **ENV, "PYTHONPATH": str(REPO)}
    loop_sizes = args.loop_sizes if args.loop_sizes is not None else args.sizes[:1]
    report = {"machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
              "model": f"{'tiny custom arch' if args.arch else args.model} (random init)",
              "batch_size": args.batch_size, "image_size_stored": args.image_size, "per_shard": args.per_shard,
              "runs": []}
    with tempfile.TemporaryDirectory(prefix="embed-bench-") as tmp:
        weights = str(Path(tmp) / "clip.safetensors")
        write_weights(Path(weights), args.model, args.arch)
        for n in args.sizes:
            shards = Path(tmp) / f"shards_{n}"
            write_shards(shards, n, args.per_shard, args.image_size)
            base = [sys.executable, __file__, "--model", args.model, "--batch-size", str(args.batch_size)]
            if args.threads:
                base += ["--threads", str(args.threads)]
            if args.arch:
                base += ["--arch", args.arch]
            stage, stage_rss = measure(base + ["--_child", "stage", str(shards), str(Path(tmp) / f"embed_{n}"), weights], env)
            row = {"samples": n, "stage": {**stage, **stage_rss}}
            if n in loop_sizes:
                for kind in ("loop", "loop_cut_text"):
                    loop, loop_rss = measure(base + ["--_child", kind, str(shards), "-", weights], env)
                    row[kind] = {**loop, **loop_rss}
                    row[f"stage_vs_{kind}"] = round(stage["samples_per_s"] / loop["samples_per_s"], 3)
            report["runs"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    runs = report["runs"]
    if len(runs) >= 2:
        first, last = runs[0]["stage"], runs[-1]["stage"]
        for kind in ("rss", "pss"):
            report[f"stage_{kind}_growth"] = round(last[f"peak_{kind}_mb"] / first[f"peak_{kind}_mb"] - 1, 3)
        report["driver_peak_rss_growth"] = round(last["driver_peak_rss_mb"] / first["driver_peak_rss_mb"] - 1, 3)
        report["stage_throughput_ratio"] = round(last["samples_per_s"] / first["samples_per_s"], 3)
        if first["samples_per_s_after_first_output"] and last["samples_per_s_after_first_output"]:
            report["steady_throughput_ratio"] = round(
                last["samples_per_s_after_first_output"] / first["samples_per_s_after_first_output"], 3)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
