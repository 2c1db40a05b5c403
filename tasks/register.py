"""register stage: the trained stack as one MLflow pyfunc model version, with gated promotion.

The model (tasks.serving) carries every part as an artifact: the CLIP directory (spec + weights,
bundled by tasks.schema.export_clip_dir), the prior, decoder and upsampler EMA checkpoints, and the
PCA basis; plus the `models` and `tasks` packages as code_paths. It is registered under
`register.model_name`; the new version gets the alias `challenger`, and `champion` moves to it
only when there is no champion yet or it beats the champion by the config's rule:

    improvement = new - champion   (direction: max)   or   champion - new   (direction: min)
    promote  <=>  improvement > min_delta

on `register.metric` from the evaluate stage's `metrics.json`. Each version keeps the metrics it
was registered with as tags (`unclip.metric.<name>`), so later runs compare against them. The
decision and its reason are tags of the version and of the stage's run (`unclip.decision`:
champion | challenger, `unclip.reason`); `unclip.step.<part>` is the step each trained part reached
(so a warm start from this version counts on from it). Aliases only: stages are deprecated in MLflow 3.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.context import EXECUTION_ONLY, StageContext

CHALLENGER, CHAMPION = "challenger", "champion"
METRICS_FILE = "metrics.json"
METRIC_TAG = "unclip.metric."
STEP_TAG = "unclip.step."  # + part: the step its weights were trained to (unclip retrain counts on from it)
DECISION_TAG, REASON_TAG = "unclip.decision", "unclip.reason"
# what the model needs at load time besides the Python standard library (no inference: it would
# run pip and list the whole training environment)
REQUIREMENTS = ("mlflow", "torch", "torchvision", "open_clip_torch", "diffusers", "safetensors", "numpy", "pandas",
                "pillow", "pyarrow")


class SamplingDefaults(BaseModel):
    """The served model's defaults for what a request leaves out (tasks.serving.INPUT_COLUMNS)."""
    model_config = ConfigDict(extra="forbid")

    prior_steps: int = Field(25, ge=1, description="diffusion prior DDIM steps")
    prior_guidance: float = Field(4.0, ge=0)
    decoder_steps: int = Field(50, ge=1)
    decoder_guidance: float | None = Field(None, ge=0, description="default: evaluate.decoder_guidance, the scale the "
                                           "model was evaluated at (Karlo's 8 is for a 3.5B-parameter decoder)")
    decoder_eta: float | None = Field(None, ge=0, description="default: evaluate.decoder_eta (DDIM eta; 1: ancestral)")
    variation_guidance: float | None = Field(None, ge=0, description="`unclip vary`'s decoder guidance of the variations "
                                             "(the served model draws from text); default: evaluate's")
    upsampler_steps: int = Field(7, ge=1)
    batch_size: int = Field(16, ge=1, description="prompts drawn at once")
    device: str | None = Field(None, description="default: cuda when available, else cpu")


class RegisterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_name: str = Field("unclip", min_length=1, description="registered model name")
    metric: str = Field("heldout/fd_clip", min_length=1, description="the evaluate stage's metric that decides promotion "
                        "(a key of its metrics.json, e.g. heldout/fd_clip, heldout/one_object_acc)")
    direction: Literal["min", "max"] = Field("min", description="min: lower is better (distances); max: higher")
    min_delta: float = Field(0.0, ge=0, description="the challenger must beat the champion by more than this")
    which: Literal["ema", "best"] = Field("ema", description="each training stage's final EMA, or its best by validation")
    smoke_test: bool = Field(True, description="load the logged model and draw one image before registering it",
                             json_schema_extra=EXECUTION_ONLY)
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str

    @property
    def alias(self) -> str:
        return CHAMPION if self.promote else CHALLENGER


def decide(new: float | None, champion: str | None, champion_value: float | None, cfg: RegisterConfig) -> Decision:
    """Whether the new version takes `champion` from version `champion` (None: there is none)."""
    metric, better = cfg.metric, "lower" if cfg.direction == "min" else "higher"
    if champion is None:
        return Decision(True, f"no {CHAMPION} yet: the first registered version becomes {CHAMPION}")
    if new is None or math.isnan(new):
        why = "no evaluate metrics in this run" if new is None else f"its {metric} is NaN"
        return Decision(False, f"{why}, so it cannot be compared with {CHAMPION} v{champion}")
    if champion_value is None or math.isnan(champion_value):
        return Decision(True, f"{CHAMPION} v{champion} has no recorded {metric}; this version has {metric}={new:.6g}")
    improvement = new - champion_value if cfg.direction == "max" else champion_value - new
    verdict = "beats" if improvement > cfg.min_delta else "does not beat"
    return Decision(improvement > cfg.min_delta,
                    f"{metric}={new:.6g} {verdict} {CHAMPION} v{champion}'s {champion_value:.6g} by more than "
                    f"min_delta={cfg.min_delta:g} ({better} is better; change {improvement:+.6g})")


def read_metrics(ctx: StageContext, cfg: RegisterConfig) -> dict[str, float]:
    """The evaluate stage's metrics when it is an input of this run, else {}."""
    if "evaluate" not in ctx.inputs:
        return {}
    path = ctx.input("evaluate") / METRICS_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read as JSON ({e}); re-run the evaluate stage") from None
    metrics = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if cfg.metric not in metrics:
        raise ValueError(f"register.metric={cfg.metric!r} is not in {path}; set register.metric to one of "
                         f"{sorted(metrics)}")
    return metrics


def trained_steps(ctx: StageContext) -> dict[str, int]:
    """{part: the step its training stage reached} from each input training stage's training.json."""
    from tasks.stack import STAGE_OF
    from tasks.training import TRAINING_FILE

    steps = {}
    for part, stage in STAGE_OF.items():
        path = ctx.inputs[stage] / TRAINING_FILE if stage in ctx.inputs else None
        if path is not None and path.is_file():
            steps[part] = int(json.loads(path.read_text())["step"])
    return steps


def requirements() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def log_stack_model(parts: dict[str, Path | None], cfg: RegisterConfig, workdir: Path, name: str = "model"):
    """Log the stack as a pyfunc model in the active run; returns mlflow's ModelInfo."""
    import mlflow

    import models
    import tasks
    from models.checkpoint import CONFIG_NAME, WEIGHTS_NAME
    from tasks import serving
    from tasks.schema import PCA_META, PCA_WEIGHTS, export_clip_dir, link_or_copy

    checkpoint_files = (CONFIG_NAME, WEIGHTS_NAME)

    # Each artifact is a directory named after its part (the checkpoints are all called `ema`),
    # holding only the part's files (not the stage's manifest and markers).
    artifacts = {"clip": str(export_clip_dir(parts["clip"], workdir / "clip"))}
    for part, files in (("prior", checkpoint_files), ("decoder", checkpoint_files), ("upsampler", checkpoint_files),
                        ("upsampler2", checkpoint_files), ("pca", (PCA_WEIGHTS, PCA_META))):
        if parts.get(part):
            (workdir / part).mkdir()
            for file in files:
                link_or_copy(parts[part] / file, workdir / part / file)
            artifacts[part] = str(workdir / part)
    code = []
    for package in (models, tasks):
        source = Path(package.__file__).parent
        code.append(str(shutil.copytree(source, workdir / "code" / source.name,
                                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))))
    with warnings.catch_warnings():  # the signature is explicit; an example would make MLflow sample at log time
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        return mlflow.pyfunc.log_model(
            name=name, python_model=serving.__file__, artifacts=artifacts, code_paths=code,
            pip_requirements=requirements(), signature=serving.signature(), model_config=cfg.sampling.model_dump(exclude_none=True),
        )


def smoke_test(model_uri: str) -> None:
    """Load the logged model as a user would and draw one small image; a model that cannot
    do that is never registered."""
    import base64
    import io

    import mlflow
    import pandas as pd
    from PIL import Image

    model = mlflow.pyfunc.load_model(model_uri)
    request = pd.DataFrame({"prompt": ["smoke test"], "seed": [0], "prior_steps": [2], "decoder_steps": [2],
                            "upsampler_steps": [2]})
    png = base64.b64decode(model.predict(request)["image"][0])
    Image.open(io.BytesIO(png)).verify()


def current_champion(client, name: str):
    """The version the alias `champion` points at, or None (no such model yet, or no such alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def run(cfg: RegisterConfig, ctx: StageContext) -> dict[str, float]:
    import mlflow

    from tasks.stack import REQUIRED_PARTS, parts_from_stage_dirs

    parts = parts_from_stage_dirs(ctx.inputs, cfg.which)
    missing = [p for p in REQUIRED_PARTS if parts[p] is None]
    if missing:
        raise FileNotFoundError(f"register: no {', '.join(missing)} in this run's stage outputs {dict(ctx.inputs)} "
                                f"(register.which={cfg.which!r}); run the training stages first")
    metrics = read_metrics(ctx, cfg)  # a bad metric name fails before anything is logged

    with tempfile.TemporaryDirectory(prefix="unclip-register-", dir=ctx.out_dir) as workdir:
        info = log_stack_model(parts, cfg, Path(workdir))
    if cfg.smoke_test:
        smoke_test(info.model_uri)

    client = mlflow.MlflowClient()
    champion = current_champion(client, cfg.model_name)  # before this version exists
    registered = mlflow.register_model(info.model_uri, cfg.model_name)
    new_version = str(registered.version)
    champion_value = None
    if champion is not None and METRIC_TAG + cfg.metric in champion.tags:
        champion_value = float(champion.tags[METRIC_TAG + cfg.metric])
    decision = decide(metrics.get(cfg.metric), str(champion.version) if champion else None, champion_value, cfg)

    tags = {DECISION_TAG: decision.alias, REASON_TAG: decision.reason, "unclip.rule_metric": cfg.metric,
            "unclip.rule": f"{cfg.direction} by more than {cfg.min_delta:g}",
            "unclip.previous_champion": str(champion.version) if champion else "none",
            "unclip.storage": str(ctx.storage), "unclip.which": cfg.which,
            **{METRIC_TAG + k: repr(v) for k, v in metrics.items()},
            **{STEP_TAG + part: str(step) for part, step in trained_steps(ctx).items()}}
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, new_version, key, value)
    client.update_model_version(cfg.model_name, new_version, description=(
        f"unCLIP stack of {ctx.storage} ({cfg.which} weights); {decision.alias}: {decision.reason}"))
    client.set_registered_model_alias(cfg.model_name, CHALLENGER, new_version)
    if decision.promote:
        client.set_registered_model_alias(cfg.model_name, CHAMPION, new_version)
    mlflow.set_tags({k: v for k, v in tags.items() if not k.startswith(METRIC_TAG)}
                    | {"unclip.model_name": cfg.model_name, "unclip.model_version": new_version})
    (ctx.out_dir / "registered.json").write_text(json.dumps(
        {"name": cfg.model_name, "version": new_version, "model_uri": f"models:/{cfg.model_name}/{new_version}",
         "logged_model_uri": info.model_uri,
         "decision": decision.alias, "reason": decision.reason}, indent=2))
    counts = {"model_version": float(new_version), "promoted": float(decision.promote)}
    if cfg.metric in metrics:
        counts[cfg.metric] = metrics[cfg.metric]
    return counts
