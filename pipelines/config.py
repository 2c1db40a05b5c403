"""The pipeline config: one pydantic model, loaded from YAML, with `--set a.b=c` overrides.

Each stage's settings are the config class of its task module; this file only composes them.
A bad config fails here, before any work starts, with the key, the bad value and what is allowed.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.embed import EmbedConfig
from tasks.evaluate import EvaluateConfig
from tasks.ingest import IngestConfig
from tasks.pca import PcaConfig
from tasks.register import RegisterConfig
from tasks.synth import SynthConfig
from tasks.train_clip import TrainClipConfig
from tasks.train_decoder import TrainDecoderConfig
from tasks.train_prior import TrainPriorConfig
from tasks.train_upsampler import TrainUpsampler2Config, TrainUpsamplerConfig

# the DAG's topological order; pipelines.dag holds the edges
STAGE_ORDER = ("synth", "ingest", "train_clip", "embed", "pca", "train_prior", "train_decoder", "train_upsampler",
               "train_upsampler2", "evaluate", "register")
# run only when listed in `stages`: train_clip (embed.clip_from: train_clip), a second upsampler
OPTIONAL_STAGES = ("train_clip", "train_upsampler2")


class ConfigError(ValueError):
    """A config that cannot run; the message names the key, the value and what is allowed."""


class MlflowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db")
    experiment: str = "unclip"


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="cluster address; default: $RAY_ADDRESS, else a local instance")
    num_cpus: int | None = Field(None, ge=1, description="local instance only")
    object_store_mb: int | None = Field(None, ge=64, description="local instance only")


# The `register` section: pydantic warns that it shadows BaseModel's `register`, which is ABCMeta's
# class method, on the metaclass: instances see the field, the class keeps the method.
warnings.filterwarnings("ignore", message='Field name "register" in "PipelineConfig" shadows', category=UserWarning)


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "unclip"
    storage: str = Field("outputs", description="root of every stage's output: a local or shared directory, or an object-store URI (s3://bucket/path, gs://...) run through a local mirror")
    seed: int = 0
    stages: list[Literal[STAGE_ORDER]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: [s for s in STAGE_ORDER if s not in OPTIONAL_STAGES])
    progress: bool = True
    parallel_stages: int = Field(1, ge=1, le=16, description="stages run at the same time when their inputs are ready "
                                 "(e.g. train_upsampler beside train_clip, train_prior beside train_decoder); 1: one by one")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    pca: PcaConfig = Field(default_factory=PcaConfig)
    train_clip: TrainClipConfig = Field(default_factory=TrainClipConfig)
    train_prior: TrainPriorConfig = Field(default_factory=TrainPriorConfig)
    train_decoder: TrainDecoderConfig = Field(default_factory=TrainDecoderConfig)
    train_upsampler: TrainUpsamplerConfig = Field(default_factory=TrainUpsamplerConfig)
    train_upsampler2: TrainUpsampler2Config = Field(default_factory=TrainUpsampler2Config)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    register: RegisterConfig = Field(default_factory=RegisterConfig)

    @field_validator("stages")
    @classmethod
    def _known_and_unique(cls, stages: list[str]) -> list[str]:
        if len(set(stages)) != len(stages):
            raise ValueError(f"stages are listed more than once: {stages}")
        if "train_upsampler2" in stages and "train_upsampler" not in stages:
            raise ValueError("train_upsampler2 (the second upsampler) is listed without train_upsampler (the first, "
                             "whose output it upsamples); add train_upsampler to stages")
        return [s for s in STAGE_ORDER if s in stages]  # run order is the DAG's, whatever the listing

    @model_validator(mode="after")
    def _sample_as_evaluated(self) -> "PipelineConfig":
        # The registered model draws at the guidance and eta it was measured at, unless the config says otherwise.
        if self.register.sampling.decoder_guidance is None:
            self.register.sampling.decoder_guidance = self.evaluate.decoder_guidance
        if self.register.sampling.decoder_eta is None:
            self.register.sampling.decoder_eta = self.evaluate.decoder_eta
        if self.register.sampling.variation_guidance is None:
            self.register.sampling.variation_guidance = self.evaluate.variation_scale()
        return self

    def stage_config(self, stage: str) -> BaseModel:
        return getattr(self, stage)


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} " + ("is a directory, not a YAML file" if path.is_dir() else "does not exist") + "; pass a pipeline YAML, e.g. pipelines/configs/demo.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror if isinstance(e, OSError) else 'not UTF-8 text'}); pass a readable YAML file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}")
    for override in overrides or []:
        apply_override(data, override)
    return validate(data, source=str(path))


def apply_override(data: dict[str, Any], override: str) -> None:
    """`a.b=c` sets data["a"]["b"] to c, with c parsed as YAML (so 3 is an int, [1, 2] a list)."""
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. --set ingest.processes=1")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {override!r}: the value is not valid YAML ({str(e).splitlines()[0]}); quote it, e.g. --set '{key}=\"...\"'") from None
    node = data
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section (`ingest:` alone in the YAML)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override!r}: {part!r} is not a section")
    node[parts[-1]] = value


def validate(data: dict[str, Any], source: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(_describe(err) for err in e.errors())) from None


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"])
    value = error.get("input")
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        section = _section_model(error["loc"][:-1])
        allowed = ", ".join(sorted(section.model_fields)) if section else "see the docs"
        return f"  {key}: unknown key (allowed here: {allowed})"
    return f"  {key}: {message} (got {value!r})"


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = PipelineConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model
