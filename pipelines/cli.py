"""`unclip` command line: run the workflow, or parts of it."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines import sample_cli
from pipelines.config import ConfigError, load_config

app = typer.Typer(help="Train unCLIP text-to-image models on your own image-caption data.", no_args_is_help=True, add_completion=False)


RUN_AGAIN = "Finished stages are kept: the same command goes on from there."


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _run_errors_exit():
    """How `run` and `retrain` end on what they expect can go wrong: one line and an exit code."""
    from pipelines.object_store import ObjectStoreError
    from pipelines.runner import StageFailed, StageInputMissing

    try:
        yield
    except (ConfigError, StageInputMissing) as e:
        _fail(str(e), 2)
    # the store failed mid-way: what is published stays consistent, a retrain's state names no missing file
    except ObjectStoreError as e:
        _fail(str(e), 1)
    except StageFailed as e:
        _fail(f"{e}\n{RUN_AGAIN}", 1)
    except KeyboardInterrupt:
        _fail(f"interrupted. {RUN_AGAIN}", 130)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="pipeline YAML, e.g. pipelines/configs/demo.yaml")],
    storage: Annotated[Optional[str], typer.Option(help="output root, a directory or an object-store URI (s3://bucket/path; "
                                                     "credentials from AWS_* env vars); overrides the config's storage")] = None,
    only: Annotated[Optional[list[str]], typer.Option(help="run only this stage (repeatable); its inputs must exist")] = None,
    until: Annotated[Optional[str], typer.Option(help="run the stages up to and including this one")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a config value: KEY=VALUE, e.g. ingest.processes=1")] = None,
) -> None:
    """Run the workflow (stages whose manifest matches are skipped)."""
    from pipelines.runner import run_pipeline

    with _run_errors_exit():
        run_pipeline(load_config(config, _with_storage(set_, storage)), only=only, until=until)


@app.command()
def retrain(
    config: Annotated[Path, typer.Argument(help="the run's pipeline YAML, e.g. pipelines/configs/demo.yaml")],
    new_urls: Annotated[list[str], typer.Option(help="a URL list to add to the run's data (repeatable; in ingest.input_format)")],
    storage: Annotated[Optional[str], typer.Option(help="the run's output root, a directory or an object-store URI; "
                                                     "overrides the config's storage")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a config value: KEY=VALUE")] = None,
) -> None:
    """Add new URL lists to a run's data and retrain every model from the registered champion's
    weights (only new shards are downloaded and embedded); register, promote by the metric rule.
    The same lists twice: nothing new, nothing runs."""
    from pipelines.retrain import retrain as run_retrain
    from pipelines.runner import console

    with _run_errors_exit():
        done = run_retrain(load_config(config, _with_storage(set_, storage)), new_urls, console)
    if done and done.get("registered"):
        registered = done["registered"]
        typer.echo(f"registered {registered['name']} v{registered['version']} ({registered['decision']}): {registered['reason']}")


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="pipeline YAML")],
    storage: Annotated[Optional[str], typer.Option(help="output root; overrides the config's storage")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a config value: KEY=VALUE")] = None,
    check_paths: Annotated[bool, typer.Option(help="also check, from this machine, what `run` checks first: storage, URL list, model files, MLflow and Ray addresses")] = False,
) -> None:
    """Check a config without running anything."""
    from pipelines.checks import preflight
    from pipelines.dag import plan

    try:
        cfg = load_config(config, _with_storage(set_, storage))
        plan(cfg)
        if check_paths:
            preflight(cfg, cfg.stages)
    except ConfigError as e:
        _fail(str(e), 2)
    typer.echo(f"{config}: valid; stages {', '.join(cfg.stages)}")


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="output directory")],
    n: Annotated[int, typer.Option(min=1, help="number of images")] = 2000,
    seed: Annotated[int, typer.Option()] = 0,
    image_size: Annotated[int, typer.Option(min=16, help="rendered resolution")] = 128,
) -> None:
    """Generate the synthetic coloured-shapes dataset (images + captions.parquet)."""
    from pipelines.checks import writable_dir_problem
    from tasks.synth import generate

    if problem := writable_dir_problem(out.absolute()):
        _fail(f"--out: {problem}; pass a writable directory", 2)
    counts = generate(out, n, seed, image_size)
    typer.echo(f"wrote {counts['images']:.0f} images ({counts['train']:.0f} train, {counts['heldout']:.0f} held-out) and captions.parquet to {out}")


def _with_storage(overrides: list[str] | None, storage: str | None) -> list[str]:
    # JSON-quoted: a path is a string, whatever YAML would make of it (`#`, `: `, `123`)
    return list(overrides or []) + ([f"storage={json.dumps(storage)}"] if storage is not None else [])


sample_cli.register(app)  # sample, vary, interpolate, textdiff, pca-probe

if __name__ == "__main__":
    app()
