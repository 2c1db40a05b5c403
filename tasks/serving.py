"""The whole trained stack as one MLflow pyfunc model: prompts in, base64 PNGs out.

MLflow loads it as "models from code" (no pickle): `log_model(python_model=<this file>)` stores
this file with the model and runs it at load time, and its last line hands MLflow the model
object. The `models` and `tasks` packages travel with the model as `code_paths` (tasks.register),
so a registered version serves with the code that wrote its checkpoints, without this repository.

    model = mlflow.pyfunc.load_model("models:/unclip@champion")
    out = model.predict(pd.DataFrame({"prompt": ["a small red circle"], "seed": [0]}))
    png = base64.b64decode(out["image"][0])
    stack = model.unwrap_python_model().stack      # tasks.stack.Stack, for the manipulations

Input: a DataFrame with `prompt` (string, required) and optional per-row sampling parameters
(`INPUT_COLUMNS`); an absent or empty value takes the model's default (`model_config`, set from
`register.sampling` when registered). A row with a `seed` is drawn on its own with a generator
seeded by it, so the same prompt, seed and settings give the same image in any request; rows
without one are drawn in batches of `batch_size`. Output: a DataFrame with `image`, a
base64-encoded PNG per row, in input order.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import AnyType, ColSpec, Schema

from tasks.stack import KARLO_SAMPLING

# artifact names of the logged model: the parts of tasks.stack
ARTIFACTS = ("clip", "prior", "decoder", "upsampler", "upsampler2", "pca")

# optional column -> (python type, smallest allowed value). The signature types them Any and
# row_settings checks them: as `long`, a request whose records give a column in some rows only
# arrives with NaN in the others, which MLflow's schema check cannot cast to int64 (HTTP 400); as
# `double`, MLflow refuses int64 columns from Python callers ("cannot safely convert").
INPUT_COLUMNS: dict[str, tuple[type, float]] = {
    "seed": (int, 0),
    "prior_steps": (int, 1),  # diffusion prior only (the AR prior draws one token per kept PCA dim)
    "prior_guidance": (float, 0.0),
    "decoder_steps": (int, 1),
    "decoder_guidance": (float, 0.0),
    "decoder_eta": (float, 0.0),
    "upsampler_steps": (int, 1),
}
MAX_INT = 2**53  # whole numbers a double holds exactly
DEFAULT_CONFIG = {**KARLO_SAMPLING, "device": None, "batch_size": 16}


def signature() -> ModelSignature:
    inputs = [ColSpec("string", "prompt")] + [ColSpec(AnyType(), name, required=False) for name in INPUT_COLUMNS]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema([ColSpec("string", "image")]))


def bad_input(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 and this message."""
    return MlflowException.invalid_parameter_value(message)


def png_base64(image) -> str:
    """One (3, H, W) image in [-1, 1] as a base64 PNG."""
    from PIL import Image

    pixels = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def row_settings(row: dict[str, Any], defaults: dict[str, Any], index: int) -> dict[str, Any]:
    """The sampling settings of one input row, checked; defaults fill absent values."""
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise bad_input(f"row {index}: `prompt` must be a string, got {prompt!r}")
    settings: dict[str, Any] = {"prompt": prompt}
    for name, (kind, lowest) in INPUT_COLUMNS.items():
        value = row.get(name)
        if _is_missing(value):
            settings[name] = defaults.get(name)
            continue
        try:
            if isinstance(value, (str, bool)):
                raise TypeError
            number = float(value)
        except (TypeError, ValueError):
            raise bad_input(f"row {index}: `{name}` must be a number, got {value!r}") from None
        whole = kind is not int or (number < MAX_INT and number == int(number))
        if not math.isfinite(number) or number < lowest or not whole:
            need = f"a whole number in [{lowest}, 2^53)" if kind is int else f"a finite number >= {lowest}"
            raise bad_input(f"row {index}: `{name}` must be {need}, got {value!r}")
        settings[name] = kind(number)
    return settings


class UnclipModel(PythonModel):
    def load_context(self, context) -> None:
        import torch

        from tasks.stack import load_stack_parts

        self.config = {**DEFAULT_CONFIG, **(context.model_config or {})}
        device = self.config["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
        parts = {name: context.artifacts.get(name) for name in ARTIFACTS}
        self.stack = load_stack_parts(parts, device=device)
        self.device = device

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or "prompt" not in model_input.columns:
            raise bad_input("the input needs a `prompt` column (one prompt per row), e.g. "
                            '{"dataframe_records": [{"prompt": "a small red circle", "seed": 0}]}')
        rows = [row_settings(r, self.config, i) for i, r in enumerate(model_input.to_dict(orient="records"))]
        # A seeded row is drawn alone, so its image depends on its prompt, seed and settings only
        # (not on the other rows of the request); unseeded rows with the same settings share batches.
        groups: dict[tuple, list[int]] = {}
        for i, settings in enumerate(rows):
            key = tuple(sorted((k, v) for k, v in settings.items() if k != "prompt"))
            groups.setdefault(key + (("row", i),) if settings["seed"] is not None else key, []).append(i)
        images: list[str | None] = [None] * len(rows)
        for key, indices in groups.items():
            settings = {k: v for k, v in key if k != "row"}
            for start in range(0, len(indices), self.config["batch_size"]):
                chunk = indices[start:start + self.config["batch_size"]]
                for i, image in zip(chunk, self._sample([rows[i]["prompt"] for i in chunk], settings)):
                    images[i] = png_base64(image)
        return pd.DataFrame({"image": images})

    def _sample(self, prompts: list[str], settings: dict[str, Any]):
        import torch

        from models.prior import DiffusionPrior
        from models.unclip import Stage

        unclip = self.stack.unclip
        generator = torch.Generator(self.device)
        if settings["seed"] is not None:
            generator.manual_seed(settings["seed"])
        else:
            generator.seed()
        prior = {"guidance_scale": settings["prior_guidance"]}
        if isinstance(unclip.prior, DiffusionPrior):
            prior["steps"] = settings["prior_steps"]
        decoder = Stage(steps=settings["decoder_steps"], eta=settings["decoder_eta"], guidance_scale=settings["decoder_guidance"])
        upsamplers = [Stage(steps=settings["upsampler_steps"])] * len(unclip.upsamplers)
        return unclip.sample(prompts, generator=generator, prior=prior, decoder=decoder, upsamplers=upsamplers)


mlflow.models.set_model(UnclipModel())
