"""The workflow as data: stage name -> its inputs and its task function.

Stages that are not built yet are simply not here. Order is `config.STAGE_ORDER`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pipelines.config import STAGE_ORDER, ConfigError, PipelineConfig
from tasks import embed, evaluate, ingest, pca, register, synth, train_clip, train_decoder, train_prior, train_upsampler


# register takes the stack's parts from every stage of this run that makes one, and the metrics
# that gate promotion from evaluate when it runs
REGISTER_NEEDS = ("embed", "train_prior", "train_decoder")
REGISTER_TAKES_IF_RUN = ("pca", "train_upsampler", "train_upsampler2", "evaluate")


def register_inputs(cfg: PipelineConfig) -> tuple[str, ...]:
    return REGISTER_NEEDS + tuple(s for s in REGISTER_TAKES_IF_RUN if s in cfg.stages)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable  # task.run(stage_config, ctx) -> dict[str, float]
    inputs: Callable[[PipelineConfig], tuple[str, ...]] = lambda cfg: ()
    # Incremental stages keep their partial output across a crash or a grown input and do only
    # what is missing; the others are wiped and redone whenever their manifest does not match.
    incremental: bool = False
    external_inputs: Callable[[PipelineConfig], list[str]] = field(default=lambda cfg: [])
    needs_ray: bool = False  # the runner starts (or joins) Ray before such a stage
    # A resumable stage (training) continues from its checkpoints after a crash with the same
    # settings, but starts over when its inputs changed.
    resumable: bool = False
    # Paths under the stage directory that survive a redo: caches named by what they depend on
    # (evaluate's real-image statistics, per dataset version), so a redo with new inputs reuses them.
    keep: tuple[str, ...] = ()
    # A stage that runs with no other stage beside it, in the main thread (the others run in threads): ingest installs
    # signal handlers (img2dataset); embed and evaluate size their Ray actor pools to the whole cluster, and beside a
    # training stage they wait for CPUs it holds while their own torch threads slow it down.
    alone: bool = False


DAG: dict[str, Stage] = {
    "synth": Stage("synth", synth.run),
    "ingest": Stage(
        "ingest",
        ingest.run,
        inputs=lambda cfg: () if cfg.ingest.url_list else ("synth",),
        incremental=True,
        alone=True,
        external_inputs=lambda cfg: [cfg.ingest.url_list] * bool(cfg.ingest.url_list) + cfg.ingest.extra_url_lists,
    ),
    # embed keeps one Parquet file per finished tar shard and embeds only shards without one
    "train_clip": Stage("train_clip", train_clip.run, inputs=lambda cfg: ("ingest",), resumable=True, needs_ray=True),
    "embed": Stage(
        "embed",
        embed.run,
        inputs=lambda cfg: ("ingest", "train_clip") if cfg.embed.clip_from == "train_clip" else ("ingest",),
        incremental=True,
        needs_ray=True,
        alone=True,
    ),
    "pca": Stage("pca", pca.run, inputs=lambda cfg: ("embed",)),
    "train_prior": Stage(
        "train_prior",
        train_prior.run,
        inputs=lambda cfg: ("embed", "pca") if cfg.train_prior.kind == "ar_prior" else ("embed",),
        resumable=True,
        needs_ray=True,
    ),
    "train_decoder": Stage(
        "train_decoder", train_decoder.run, inputs=lambda cfg: ("ingest", "embed"), resumable=True, needs_ray=True
    ),
    "train_upsampler": Stage(
        "train_upsampler", train_upsampler.run, inputs=lambda cfg: ("ingest",), resumable=True, needs_ray=True
    ),
    # the second upsampler (the paper's 256→1024) trains from the images alone, like the first
    "train_upsampler2": Stage(
        "train_upsampler2", train_upsampler.run, inputs=lambda cfg: ("ingest",), resumable=True, needs_ray=True
    ),
    "evaluate": Stage(
        "evaluate",
        evaluate.run,
        inputs=lambda cfg: ("ingest", "embed", *(s for s in ("pca",) if s in cfg.stages), "train_prior", "train_decoder",
                            *(s for s in ("train_upsampler", "train_upsampler2") if s in cfg.stages)),
        needs_ray=True,
        alone=True,
        keep=(evaluate.REAL_STATS,),
    ),
    "register": Stage("register", register.run, inputs=register_inputs),
}
assert tuple(DAG) == STAGE_ORDER


def plan(cfg: PipelineConfig, only: list[str] | None = None, until: str | None = None) -> list[Stage]:
    """The stages to consider, in order; checks that each one's inputs can exist."""
    for name in [*(only or []), *([until] if until else [])]:
        if name not in cfg.stages:
            raise ConfigError(f"stage {name!r} is not in this config's stages {cfg.stages} (known stages: {list(STAGE_ORDER)})")
    names = list(cfg.stages)
    if until:
        names = names[: names.index(until) + 1]
    if only:
        names = [n for n in names if n in only]
    for name in names:
        for needed in DAG[name].inputs(cfg):
            if needed not in cfg.stages:
                raise ConfigError(f"stage {name!r} needs the output of {needed!r}, which is not in stages {cfg.stages}")
    return [DAG[n] for n in names]
