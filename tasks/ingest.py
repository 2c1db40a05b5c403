"""Ingest: img2dataset from a URL+caption list to webdataset tar shards.

Output (`<storage>/ingest/`): img2dataset's own layout, `{shard:05d}.tar` with
`{key}.jpg|.txt|.json`, plus `{shard:05d}.parquet` (per-URL status and error) and
`{shard:05d}_stats.json`. The stage is incremental: img2dataset skips shards that have a stats
file, so re-running with an extended URL list downloads only the new shards.

With no `url_list`, the input is the synth stage's images, served on 127.0.0.1 for the run.
`extra_url_lists` (what `unclip retrain` adds) are appended after that input, in order, as one
list: the shards of the earlier rows stay as they are and only the new rows are downloaded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from tasks.context import APPENDED_INPUT, EXECUTION_ONLY, StageContext, one_line
from tasks.http_server import serve_directory

SYNTH_COLUMNS = ["id", "split", "objects"]  # carried from the synth captions into each sample's json


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url_list: str | None = Field(None, description="parquet/csv/tsv URL list (local or s3://...); none: the synth stage's images")
    extra_url_lists: list[str] = Field(
        default_factory=list, description="URL lists appended after the input, in order (unclip retrain adds them); "
        "in input_format, with url_col, caption_col and additional_columns", json_schema_extra=APPENDED_INPUT)
    input_format: Literal["parquet", "csv", "tsv", "txt", "json"] = "parquet"
    url_col: str = "url"
    caption_col: str = "caption"
    additional_columns: list[str] = Field(default_factory=list, description="extra input columns kept in each sample's json")
    image_size: int = Field(64, ge=8, le=4096)
    resize_mode: Literal["border", "keep_ratio", "center_crop", "no"] = "center_crop"
    shard_size: int = Field(10_000, ge=1, description="samples per tar shard")
    processes: int = Field(2, ge=1, json_schema_extra=EXECUTION_ONLY)
    threads: int = Field(16, ge=1, json_schema_extra=EXECUTION_ONLY)
    timeout_s: int = Field(10, ge=1)
    retries: int = Field(0, ge=0)
    min_image_size: int = Field(0, ge=0)
    max_image_area: float = Field(float("inf"), gt=0, description="images with more pixels are skipped")
    # img2dataset's opt-out handling: X-Robots-Tag noai/noimageai/... refuse the image.
    disallowed_header_directives: list[str] = Field(default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    distributor: Literal["auto", "multiprocessing", "ray"] = Field("auto", description="auto: ray on a multi-node cluster, else multiprocessing", json_schema_extra=EXECUTION_ONLY)
    max_failure_rate: float = Field(0.5, ge=0.0, le=1.0, description="fail the stage when more of the URLs fail")


class IngestError(RuntimeError):
    pass


def run(cfg: IngestConfig, ctx: StageContext) -> dict[str, float]:
    cfg = cfg.model_copy(update={"distributor": choose_distributor(cfg.distributor, ctx.driver_node_id)})
    if cfg.url_list is not None and not cfg.extra_url_lists:
        return download(cfg, cfg.url_list, cfg.input_format, cfg.additional_columns, ctx.out_dir)
    import pandas as pd

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="unclip-urls-")))
        if cfg.url_list is not None:
            columns = list(cfg.additional_columns)
            rows = read_url_list(cfg, cfg.url_list, columns)
        else:
            synth_dir = ctx.input("synth")
            base_url = stack.enter_context(serve_directory(synth_dir))
            rows = pq.read_table(synth_dir / "captions.parquet").to_pandas()
            rows["url"] = base_url + "/" + rows["path"]
            columns = SYNTH_COLUMNS + cfg.additional_columns
            rows = rows[["url", "caption", *SYNTH_COLUMNS]]
        # one list, the appended rows last: the shards of the earlier rows keep their rows
        extra = [read_url_list(cfg, url_list, columns, all_columns=cfg.url_list is not None) for url_list in cfg.extra_url_lists]
        url_file = tmp / "urls.parquet"
        pd.concat([rows, *extra], ignore_index=True).to_parquet(url_file, index=False)
        settings = cfg.model_copy(update={"url_col": "url", "caption_col": "caption"})
        return download(settings, str(url_file), "parquet", columns, ctx.out_dir)


def read_url_list(cfg: IngestConfig, url_list: str, columns: list[str], all_columns: bool = True):
    """The list's rows as a DataFrame with columns url, caption and `columns` (only those it has,
    unless all_columns: the synth captions' id/split/objects may be missing from an added list)."""
    import pandas as pd

    fs, files = url_list_files(url_list, cfg.input_format)
    if not files:
        raise IngestError(f"ingest: URL list {url_list} {'does not exist' if files is None else 'has no *.' + cfg.input_format + ' files'}")
    frames = []
    for file in files:
        with fs.open(file, "rb") as f:
            if cfg.input_format == "parquet":
                frame = pd.read_parquet(f)
            elif cfg.input_format in ("csv", "tsv"):
                frame = pd.read_csv(f, sep="," if cfg.input_format == "csv" else "\t")
            else:
                raise IngestError(f"ingest: URL list {url_list}: appending lists needs input_format parquet, csv or "
                                  f"tsv, not {cfg.input_format}")
        kept = [c for c in columns if all_columns or c in frame.columns]
        frames.append(frame.rename(columns={cfg.url_col: "url", cfg.caption_col: "caption"})[["url", "caption", *kept]])
    return pd.concat(frames, ignore_index=True)


def download(cfg: IngestConfig, url_list: str, input_format: str, additional_columns: list[str], out_dir: Path) -> dict[str, float]:
    import img2dataset  # imports ray and wandb: seconds, so only when the stage runs

    redo = forget_partial_shards(out_dir, cfg.shard_size)
    with temporary_tmpdir():
        img2dataset.download(
            url_list=url_list,
            input_format=input_format,
            url_col=cfg.url_col,
            caption_col=cfg.caption_col,
            save_additional_columns=additional_columns or None,
            output_folder=str(out_dir),
            output_format="webdataset",
            image_size=cfg.image_size,
            resize_mode=cfg.resize_mode,
            number_sample_per_shard=cfg.shard_size,
            processes_count=cfg.processes,
            thread_count=cfg.threads,
            timeout=cfg.timeout_s,
            retries=cfg.retries,
            min_image_size=cfg.min_image_size,
            max_image_area=cfg.max_image_area,
            disallowed_header_directives=cfg.disallowed_header_directives,
            distributor=choose_distributor(cfg.distributor),
            incremental_mode="incremental",
            enable_wandb=False,
        )
    counts = summarise(out_dir)
    expected_shards = math.ceil(_count_rows(url_list, input_format) / cfg.shard_size)
    if counts["shards"] != expected_shards:
        raise IngestError(
            f"ingest wrote {counts['shards']:.0f} of {expected_shards} shards into {out_dir}; "
            "img2dataset failed on the rest (see its log above). Re-run to retry the missing shards."
        )
    counts["shards_redone_partial"] = redo
    failure_rate = 1.0 - counts["success"] / max(counts["total"], 1)
    if failure_rate > cfg.max_failure_rate:
        reasons = ", ".join(f"{k[len('failed_'):]}={v:.0f}" for k, v in counts.items() if k.startswith("failed_") and v and k not in ("failed_to_download", "failed_to_resize"))
        raise IngestError(
            f"ingest: {failure_rate:.0%} of {counts['total']:.0f} URLs failed, above ingest.max_failure_rate={cfg.max_failure_rate} "
            f"(reasons: {reasons}). Check the URL list ({url_list}) or raise ingest.max_failure_rate."
        )
    return counts


@contextlib.contextmanager
def temporary_tmpdir():
    """img2dataset's spawned processes import wandb, which makes two temporary directories in each
    at import and never removes them (the pool kills its processes): TMPDIR points them at one
    directory of this call's, removed afterwards."""
    previous = os.environ.get("TMPDIR")
    with tempfile.TemporaryDirectory(prefix="unclip-ingest-") as scratch:
        os.environ["TMPDIR"] = scratch
        try:
            yield
        finally:
            if previous is None:
                del os.environ["TMPDIR"]
            else:
                os.environ["TMPDIR"] = previous


def choose_distributor(setting: str, driver_node_id: str | None = None) -> str:
    """img2dataset's ray distributor hands files to its workers through the output folder, so it
    needs a folder every node sees; where other nodes keep their own copy of storage, ingest
    downloads on the driver's node."""
    if driver_node_id:
        if setting == "ray":
            raise ValueError("ingest.distributor ray: img2dataset's Ray workers exchange files through the output folder, "
                             "which the cluster's other nodes do not see (each keeps its own copy of the object store); "
                             "use distributor auto or multiprocessing (downloads on the driver's node)")
        return "multiprocessing"
    if setting != "auto":
        return setting
    import ray

    on_cluster = ray.is_initialized() and sum(1 for node in ray.nodes() if node.get("Alive")) > 1
    return "ray" if on_cluster else "multiprocessing"


def forget_partial_shards(out_dir: Path, shard_size: int) -> int:
    """img2dataset counts a shard as done once it has a stats file. A shard that was the short
    last one of a previous, shorter URL list would then never get its new rows: remove it so it
    is downloaded again. Returns how many shards were removed."""
    removed = 0
    for stats_file in Path(out_dir).glob("*_stats.json"):
        if json.loads(stats_file.read_text())["count"] < shard_size:
            shard = stats_file.name.split("_")[0]
            for path in (stats_file, out_dir / f"{shard}.tar", out_dir / f"{shard}.parquet"):
                path.unlink(missing_ok=True)
            removed += 1
    return removed


def failure_reason(status: str, message: str | None) -> str:
    """Group img2dataset's free-text errors into a few reasons worth counting."""
    message = (message or "").lower()
    if status == "success":
        return "success"
    if "x-robots-tag" in message:
        return "opted_out"
    if match := re.search(r"http error (\d+)", message):
        return f"http_{match.group(1)}"
    if "timed out" in message or "timeout" in message:
        return "timeout"
    if "image area too large" in message or "aspect ratio too large" in message:
        return "too_large"
    if "image too small" in message:
        return "too_small"
    if status == "failed_to_resize":
        return "decode_error"
    if "connection" in message or "urlopen error" in message:
        return "connection_error"
    return "other_download_error"


def summarise(out_dir: Path) -> dict[str, float]:
    """Totals from img2dataset's per-shard stats and per-URL status tables."""
    totals = Counter()
    reasons = Counter()
    for stats_file in sorted(Path(out_dir).glob("*_stats.json")):
        stats = json.loads(stats_file.read_text())
        totals.update(total=stats["count"], success=stats["successes"], failed_to_download=stats["failed_to_download"], failed_to_resize=stats["failed_to_resize"], shards=1)
        shard = stats_file.name.split("_")[0]
        status = pq.read_table(out_dir / f"{shard}.parquet", columns=["status", "error_message"]).to_pylist()
        reasons.update(failure_reason(row["status"], row["error_message"]) for row in status)
    reasons.pop("success", None)
    counts = {key: float(totals[key]) for key in ("total", "success", "failed_to_download", "failed_to_resize", "shards")}
    counts.update({f"failed_{reason}": float(n) for reason, n in sorted(reasons.items())})
    return counts


def check_inputs(cfg: IngestConfig, storage: Path) -> list[str]:
    """Problems with the URL lists (the input and the appended ones), found before any stage runs:
    each must exist (or, remote, be listable), be readable as `input_format`, and have the
    configured columns."""
    problems = []
    for extra in cfg.extra_url_lists:  # with the synth stage's input, an added list needs only url and caption
        settings = cfg.model_copy(update={"url_list": extra, "additional_columns": cfg.additional_columns if cfg.url_list else []})
        problems += check_url_list(settings, f"ingest.extra_url_lists {extra}")
    if cfg.url_list is None:
        return problems
    return problems + check_url_list(cfg, f"ingest.url_list {cfg.url_list}")


def check_url_list(cfg: IngestConfig, key: str) -> list[str]:
    url_list, fmt = cfg.url_list, cfg.input_format
    try:
        fs, files = url_list_files(url_list, fmt)
    except Exception as e:  # no s3fs, no credentials, no network: the reason, in one line
        return [f"{key}: cannot be listed ({one_line(e)}); check the path and your access to it"]
    if files is None:
        return [f"{key} does not exist; set ingest.url_list to an existing file or folder (local or s3://...)"]
    if not files:
        return [f"{key}: a folder without *.{fmt} files; set ingest.input_format to its files' format or point ingest.url_list at another folder"]
    try:
        columns = _columns(fs, files[0], fmt)
    except Exception as e:
        suffix = files[0].rsplit(".", 1)[-1].lower()
        hint = f"; it looks like {suffix}: set ingest.input_format={suffix}" if suffix in ("parquet", "csv", "tsv", "json", "txt") and suffix != fmt else ""
        return [f"{key}: cannot be read as {fmt} ({one_line(e)}){hint}"]
    wanted = {"ingest.url_col": [cfg.url_col], "ingest.caption_col": [cfg.caption_col], "ingest.additional_columns": cfg.additional_columns}
    missing = [f"{name!r} ({option})" for option, names in wanted.items() for name in names if columns is not None and name not in columns]
    if missing:
        return [f"{key}: no column {', '.join(missing)}; its columns are {columns}: set those options to the list's column names"]
    return []


def url_list_files(url_list: str, input_format: str):
    """(filesystem, files) as img2dataset reads them: a file, or a folder's *.{input_format};
    files is None when nothing is at url_list."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url_list)
    try:
        info = fs.info(path)  # not isdir/exists: they turn "access denied" into "not there"
    except FileNotFoundError:
        return fs, None
    if info["type"] == "directory":
        return fs, sorted(fs.glob(path.rstrip("/") + "/*." + input_format))
    return fs, [path]


def _columns(fs, file: str, input_format: str) -> list[str] | None:
    """Column names of a parquet/csv/tsv URL list (reads the footer or header only); None: not checked."""
    import pandas as pd

    with fs.open(file, "rb") as f:
        if input_format == "parquet":
            return pq.read_schema(f).names
        if input_format in ("csv", "tsv"):
            return list(pd.read_csv(f, sep="," if input_format == "csv" else "\t", nrows=0).columns)
    return None


def _count_rows(url_list: str, input_format: str) -> int:
    import pandas as pd

    fs, files = url_list_files(url_list, input_format)
    total = 0
    for file in files:
        with fs.open(file, "rb") as f:
            if input_format == "parquet":
                total += pq.ParquetFile(f).metadata.num_rows
            elif input_format in ("csv", "tsv"):
                total += len(pd.read_csv(f, sep="," if input_format == "csv" else "\t", usecols=[0]))
            elif input_format == "json":
                total += len(pd.read_json(f))
            else:
                total += sum(1 for line in f if line.strip())
    return total
