"""The trained stack of a run, loaded from its storage directory without Ray: the one place that
knows which stage wrote which part (evaluation, registration and the sampling CLI share it).

    stack = load_stack("/tmp/u1")                  # <storage>/{embed,pca,train_*}/
    images = stack.unclip.sample(["a small red circle"], generator=g)   # (B, 3, H, W) in [-1, 1]
    z_i = stack.clip.encode_image(stack.clip.normalize(uint8_batch))

Parts (`PARTS`, each a directory): the CLIP that embedded the table (`embed/clip`), the prior
(`train_prior/ema`), the decoder (`train_decoder/ema`), the upsamplers (`train_upsampler/ema` and
`train_upsampler2/ema`, optional, run in that order), the PCA basis (`pca/`, optional). `which="best"` takes each stage's best-by-validation
EMA instead of its final one. `load_stack_parts` loads from any such dict of directories (e.g. a
registered model's artifacts, tasks.serving), `load_stack` from a storage directory.

`resolve_model` turns the sampling CLI's --model, a storage directory or a registry URI
(`models:/name@alias`, `models:/name/version`, downloaded), into such a dict; `find_parts` finds
the parts in a downloaded model: a pyfunc whose artifacts are named after the parts (tasks.register
logs one), part folders with those names, or a run's storage layout. `recorded_sampling` reads the
sampling settings the model was registered or configured with (register.sampling), for the CLI's defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

STAGE_OF = {"prior": "train_prior", "decoder": "train_decoder", "upsampler": "train_upsampler",
            "upsampler2": "train_upsampler2"}
PART_OF = {stage: part for part, stage in STAGE_OF.items()}  # the part a training stage makes
PARTS = ("clip", "prior", "decoder", "upsampler", "upsampler2", "pca")
UPSAMPLERS = ("upsampler", "upsampler2")  # in the order they run
REQUIRED_PARTS = ("clip", "prior", "decoder")
# the file that marks a part's directory as complete
MARKER = {"clip": "clip_spec.json", "prior": "config.json", "decoder": "config.json", "upsampler": "config.json",
          "upsampler2": "config.json", "pca": "pca.json"}


# Sampling settings for a model that records none (recorded_sampling): Karlo's published ones, used
# by `unclip sample` and the served model. Decoder guidance 8 suits Karlo's 3.5B-parameter decoder.
KARLO_SAMPLING = {"prior_steps": 25, "prior_guidance": 4.0, "decoder_steps": 50, "decoder_guidance": 8.0,
                  "decoder_eta": 0.0, "upsampler_steps": 7}
# the settings a run records (register.sampling) and sampling takes; variation_guidance is `unclip vary`'s only
SAMPLING_KEYS = (*KARLO_SAMPLING, "variation_guidance")
RUN_CONFIG = Path("_pipeline") / "config.yaml"  # the pipeline config a run wrote (pipelines.runner)


class StackError(FileNotFoundError):
    """A storage directory without the parts a command needs; the message says which and how to make them."""


@dataclass
class Stack:
    unclip: Any  # models.unclip.UnCLIP with a text encoder
    clip: Any  # models.clip.ClipEncoder (frozen)
    pca: Any | None  # models.pca.PcaBasis
    storage: Path | None = None  # the run's storage, when loaded from one
    sampling: dict[str, float] = field(default_factory=dict)  # recorded_sampling of its source

    @property
    def image_size(self) -> int:
        ups = self.unclip.upsamplers
        return ups[-1].config.image_size if ups else self.unclip.decoder.config.image_size


def parts_from_stage_dirs(stage_dirs: Mapping[str, str | os.PathLike], which: Literal["ema", "best"] = "ema") -> dict[str, Path | None]:
    """{part: directory or None} from stage output directories ({"embed": ..., "train_prior": ...});
    a stage that is absent, or did not write its part, gives None."""
    dirs = {name: Path(d) for name, d in stage_dirs.items() if d is not None}
    candidates = {"clip": dirs["embed"] / "clip" if "embed" in dirs else None, "pca": dirs.get("pca")}
    for part, stage in STAGE_OF.items():
        candidates[part] = dirs[stage] / which if stage in dirs else None
    return {part: path if path is not None and (path / MARKER[part]).is_file() else None for part, path in candidates.items()}


def stack_parts(storage: str | os.PathLike, which: Literal["ema", "best"] = "ema") -> dict[str, Path | None]:
    """Paths of each part of a run's storage (None for an optional part that is absent); StackError naming the missing ones."""
    storage = Path(storage)
    parts = parts_from_stage_dirs({s: storage / s for s in ("embed", "pca", *STAGE_OF.values())}, which)
    missing = [f"{p} ({storage / ('embed/clip' if p == 'clip' else STAGE_OF[p] + '/' + which)})"
               for p in REQUIRED_PARTS if parts[p] is None]
    if missing:
        raise StackError(f"{storage} has no trained {', '.join(missing)}: run the pipeline there first "
                         f"(e.g. unclip run pipelines/configs/quick.yaml --storage {storage})")
    return parts


def find_parts(directory: str | os.PathLike, which: Literal["ema", "best"] = "ema") -> dict[str, Path | None]:
    """The parts of a stack somewhere below `directory` (e.g. a downloaded registered model); StackError
    saying what was expected and found otherwise."""
    directory = Path(directory)
    folders = sorted((p for p in [directory, *directory.rglob("*")] if p.is_dir()), key=lambda p: (len(p.parts), str(p)))
    for folder in folders:  # a pyfunc model: its MLmodel says where MLflow put each artifact
        if (folder / "MLmodel").is_file() and (parts := _pyfunc_parts(folder)):
            return parts
    for folder in folders:
        if (folder / "embed" / "clip" / MARKER["clip"]).is_file() and (folder / STAGE_OF["prior"] / which / MARKER["prior"]).is_file():
            return stack_parts(folder, which)
    found = {}
    for folder in folders:
        if folder.name in PARTS and folder.name not in found and (folder / MARKER[folder.name]).is_file():
            found[folder.name] = folder
    return _complete(found, f"{directory} holds no unCLIP stack: expected a pyfunc model whose artifacts are "
                            "named clip, prior, decoder[, upsampler, upsampler2, pca], folders with those names, or a run's "
                            "storage layout (embed/clip, train_prior/, train_decoder/...)")


def _pyfunc_parts(model_dir: Path) -> dict[str, Path | None] | None:
    import yaml

    try:
        flavors = (yaml.safe_load((model_dir / "MLmodel").read_text()) or {}).get("flavors", {})
        artifacts = flavors.get("python_function", {}).get("artifacts", {}) or {}
        paths = {name: model_dir / info["path"] for name, info in artifacts.items() if name in PARTS}
    except (yaml.YAMLError, AttributeError, KeyError, TypeError):
        return None
    if not paths:
        return None
    found = {name: path for name, path in paths.items() if (path / MARKER[name]).is_file()}
    return _complete(found, f"{model_dir} is an MLflow model with artifacts {sorted(paths)}, but not a complete unCLIP stack")


def recorded_sampling(directory: str | os.PathLike) -> dict[str, float]:
    """{setting: value} of SAMPLING_KEYS that `directory` records: the `register.sampling` of a run's
    config (`<directory>/_pipeline/config.yaml`), else a pyfunc model's config in it or below
    (tasks.register sets it from register.sampling); {} when there is neither (bare part folders)."""
    import yaml

    directory = Path(directory)
    candidates = [(directory / RUN_CONFIG, ("register", "sampling"))]
    if not candidates[0][0].is_file():  # a downloaded model, not a run (whose mlruns/ may hold older versions)
        candidates += [(m, ("flavors", "python_function", "config")) for m in sorted(directory.rglob("MLmodel"))]
    for path, keys in candidates:
        try:
            node = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            return {k: node[k] for k in SAMPLING_KEYS if isinstance(node.get(k), (int, float))}
    return {}


def _complete(found: dict[str, Path], problem: str) -> dict[str, Path | None]:
    missing = [p for p in REQUIRED_PARTS if p not in found]
    if missing:
        have = ", ".join(f"{k} ({v})" for k, v in found.items()) or "none"
        raise StackError(f"{problem}; missing {', '.join(missing)} (found: {have})")
    return {part: found.get(part) for part in PARTS}


def resolve_model(model: str, download_to: str | os.PathLike, tracking_uri: str | None = None,
                  which: Literal["ema", "best"] = "ema") -> dict[str, Path | None]:
    """Part directories of the sampling CLI's --model: a run's storage directory, or a registry URI
    (`models:/name@alias`, `models:/name/version`) whose artifacts are downloaded into `download_to`.
    StackError with the reason and the fix otherwise."""
    if model.startswith("models:/"):
        import mlflow
        from mlflow.exceptions import MlflowException

        source, uri = registry_source(model, tracking_uri)
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(download_to), tracking_uri=uri)
        except MlflowException as e:
            raise _registry_error(e, uri) from None
        return find_parts(local, which)
    if "://" in model or model.startswith(("models:", "runs:")):
        raise StackError("not a storage directory or a registry URI; use a run's storage directory or "
                         "models:/name@alias, models:/name/version")
    path = Path(model)
    if not path.is_dir():
        raise StackError(f"{'is a file, not a' if path.exists() else 'no such'} directory; pass a run's storage "
                         "directory or a registry URI (models:/name@alias)")
    return stack_parts(path, which)


def registry_source(model: str, tracking_uri: str | None = None) -> tuple[str, str]:
    """(artifact URI of the model version, tracking URI) of a registry URI (`models:/name@alias`,
    `models:/name/version`), without downloading anything; StackError if it does not resolve."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or mlflow.get_tracking_uri()
    # An explicit client: `download_artifacts("models:/...")` resolves the registry through the
    # process-wide tracking URI whatever `registry_uri` says, so `--tracking-uri` could be ignored.
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    name, sep, alias = model[len("models:/"):].partition("@")
    try:
        if sep:
            version = client.get_model_version_by_alias(name, alias).version
        else:
            name, _, version = name.rpartition("/")
        return moved_with_the_store(client.get_model_version_download_uri(name, version), uri), uri
    except MlflowException as e:
        raise _registry_error(e, uri) from None


def moved_with_the_store(source: str, tracking_uri: str) -> str:
    """`source`, a model's artifact URI, at the same place below the sqlite store's folder when the
    recorded path is gone: MLflow records absolute artifact paths, so in a storage moved or copied
    as a whole (its mlflow.db beside mlruns/) the registry still names the old place."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(source)
    if not tracking_uri.startswith("sqlite:///") or parsed.scheme not in ("", "file"):
        return source
    recorded = Path(unquote(parsed.path))
    if recorded.exists() or "mlruns" not in recorded.parts:
        return source
    last = max(i for i, part in enumerate(recorded.parts) if part == "mlruns")
    here = Path(tracking_uri[len("sqlite:///"):]).parent.joinpath(*recorded.parts[last:])
    return here.absolute().as_uri() if here.exists() else source


def _registry_error(error, uri: str) -> StackError:
    reason = (str(error.message).strip().splitlines() or ["unknown error"])[0]
    return StackError(f"cannot fetch it from the model registry at {uri} ({reason}); check the name, alias "
                      "or version, and point MLFLOW_TRACKING_URI (or --tracking-uri) at the store the "
                      "model was registered in")


def load_stack(storage: str | os.PathLike, device: str = "cpu", which: Literal["ema", "best"] = "ema",
               upsample: bool = True) -> Stack:
    return load_stack_parts(stack_parts(storage, which), device=device, upsample=upsample, storage=Path(storage),
                            sampling=recorded_sampling(storage))


def load_stack_parts(parts: Mapping[str, str | os.PathLike | None], device: str = "cpu", upsample: bool = True,
                     storage: Path | None = None, sampling: dict[str, float] | None = None) -> Stack:
    """The stack from a dict of part directories (keys of PARTS; the upsamplers and pca may be None or absent)."""
    from models import checkpoint
    from models.unclip import UnCLIP, clip_text_encoder
    from tasks.schema import load_clip_dir, load_pca

    missing = [p for p in REQUIRED_PARTS if not parts.get(p)]
    if missing:
        raise StackError(f"the stack needs the parts {list(REQUIRED_PARTS)}; missing: {missing}")
    if parts.get("upsampler2") and not parts.get("upsampler"):
        raise StackError(f"the stack has a second upsampler ({parts['upsampler2']}) but no first one to feed it; "
                         "train (or register) train_upsampler too")
    clip = load_clip_dir(parts["clip"], device=device).eval()
    prior = checkpoint.load(parts["prior"], map_location=device).eval()
    decoder = checkpoint.load(parts["decoder"], map_location=device).eval()
    upsamplers = [checkpoint.load(parts[p], map_location=device).eval() for p in UPSAMPLERS if upsample and parts.get(p)]
    pca = load_pca(parts["pca"]) if parts.get("pca") else None
    unclip = UnCLIP(decoder, prior, upsamplers, text_encoder=clip_text_encoder(clip))
    return Stack(unclip=unclip, clip=clip, pca=pca, storage=storage, sampling=dict(sampling or {}))
