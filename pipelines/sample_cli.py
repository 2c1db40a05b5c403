"""`unclip sample | vary | interpolate | textdiff | pca-probe`: images from a trained stack.

    unclip sample --model /tmp/u1 --prompt "a small red circle" --n 8 --out grid.png
    unclip vary --model models:/unclip@champion --image in.png --eta 0.5 --n 8 --out vary.png

--model is a run's storage directory or a registry URI (models:/name@alias, models:/name/version;
tasks.stack.resolve_model). Each command writes one PNG grid (tasks.grids): a row per prompt or
input image, inputs first in their row, a caption under each row. The image commands are the
paper's section 3 (vary, interpolate, textdiff: DDIM inversion of the decoder gives the image's
x_T) and section 4 (pca-probe). Cheap checks (options, files) run before the model loads.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Iterator, Optional, Sequence

import typer

from tasks.grids import to_uint8
from tasks.stack import KARLO_SAMPLING

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from tasks.stack import Stack

DEFAULT_STEPS = KARLO_SAMPLING["decoder_steps"]  # the image commands' decoder DDIM steps
UPSAMPLER_STEPS = KARLO_SAMPLING["upsampler_steps"]
RECORDED = "default: the model's register.sampling, else Karlo's"


class UsageError(Exception):
    """A bad option value; the message names the option (exit code 2)."""


# ----- options shared by the commands ----------------------------------------------------------
Model = Annotated[str, typer.Option("--model", help="a run's storage directory, or a registry URI models:/name@alias | models:/name/version")]
Out = Annotated[Path, typer.Option("--out", help="PNG file to write")]
Seed = Annotated[int, typer.Option(help="random seed (same seed and batch size: same images)")]
BatchSize = Annotated[int, typer.Option(min=1, help="images decoded at once")]
DecoderSteps = Annotated[int, typer.Option(min=1, help="decoder DDIM steps (also the inversion's)")]
DecoderGuidance = Annotated[Optional[float], typer.Option(min=0, help="decoder classifier-free guidance, the inversion's too (default: the "
                                                          "model's recorded one, evaluate's decoder_guidance; 1 when none is recorded)")]
UpsamplerSteps = Annotated[int, typer.Option(min=1, help="upsampler DDIM steps")]
Device = Annotated[Optional[str], typer.Option(help="torch device (default: cuda when available, else cpu)")]
TrackingUri = Annotated[Optional[str], typer.Option(help="MLflow tracking/registry URI for models:/ URIs (default: MLFLOW_TRACKING_URI)")]
Progress = Annotated[bool, typer.Option(help="show a progress bar over batches")]
OneImage = Annotated[Path, typer.Option("--image", help="input image (PNG, JPEG, ...)")]


def register(app: typer.Typer) -> None:
    app.command("sample")(sample)
    app.command("vary")(vary)
    app.command("interpolate")(interpolate)
    app.command("textdiff")(textdiff)
    app.command("pca-probe", context_settings={"allow_extra_args": True})(pca_probe)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@contextmanager
def _usage_errors() -> Iterator[None]:
    try:
        yield
    except UsageError as e:
        _fail(str(e))


# ----- commands ---------------------------------------------------------------------------------
def sample(
    model: Model,
    out: Out,
    prompt: Annotated[Optional[list[str]], typer.Option(help="caption to draw (repeatable): one row each")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(help="text file of captions, one per line")] = None,
    n: Annotated[int, typer.Option(min=1, help="images per prompt")] = 4,
    seed: Seed = 0,
    batch_size: BatchSize = 16,
    prior_steps: Annotated[Optional[int], typer.Option(min=1, help=f"diffusion prior DDIM steps ({RECORDED}: 25; the AR prior has none)")] = None,
    prior_guidance: Annotated[Optional[float], typer.Option(min=0, help=f"prior classifier-free guidance ({RECORDED}: 4)")] = None,
    decoder_steps: Annotated[Optional[int], typer.Option(min=1, help=f"decoder DDIM steps ({RECORDED}: 50)")] = None,
    decoder_guidance: Annotated[Optional[float], typer.Option(min=0, help=f"decoder classifier-free guidance ({RECORDED}: 8; a pipeline run records the guidance its evaluate stage used)")] = None,
    decoder_eta: Annotated[Optional[float], typer.Option(min=0, help=f"decoder DDIM eta, 0 deterministic, 1 ancestral ({RECORDED}: 0)")] = None,
    upsampler_steps: Annotated[Optional[int], typer.Option(min=1, help=f"upsampler DDIM steps ({RECORDED}: 7)")] = None,
    device: Device = None,
    tracking_uri: TrackingUri = None,
    progress: Progress = True,
) -> None:
    """Text to images: prior -> decoder -> upsampler, n images per prompt, with the model's recorded
    sampling settings (register.sampling) unless the options say otherwise."""
    with _usage_errors():
        prompts = _prompts(prompt, prompt_file)
        _check_out(out)
        with _open_stack(model, device, tracking_uri) as stack:
            import torch

            from models.unclip import Stage

            given = {"prior_steps": prior_steps, "prior_guidance": prior_guidance, "decoder_steps": decoder_steps,
                     "decoder_guidance": decoder_guidance, "decoder_eta": decoder_eta, "upsampler_steps": upsampler_steps}
            settings = {**KARLO_SAMPLING, **stack.sampling, **{k: v for k, v in given.items() if v is not None}}
            prior_kwargs = _prior_kwargs(stack, settings["prior_steps"], settings["prior_guidance"], prior_steps is not None)
            decoder = Stage(steps=int(settings["decoder_steps"]), eta=float(settings["decoder_eta"]),
                            guidance_scale=float(settings["decoder_guidance"]))
            ups = _upsampler_stages(stack, int(settings["upsampler_steps"]))
            generator = _generator(stack, seed)
            captions = [p for p in prompts for _ in range(n)]
            images = []
            for chunk in _batches(captions, batch_size, "sampling", progress):
                images.append(stack.unclip.sample(chunk, generator=generator, prior=prior_kwargs, decoder=decoder, upsamplers=ups))
            tiles = to_uint8(torch.cat(images))
            rows = [(p, tiles[i * n:(i + 1) * n]) for i, p in enumerate(prompts)]
            _write(out, rows, stack)


def vary(
    model: Model,
    out: Out,
    image: Annotated[list[Path], typer.Option(help="input image (repeatable): one row each")],
    n: Annotated[int, typer.Option(min=1, help="variations per image")] = 4,
    eta: Annotated[float, typer.Option(min=0, help="DDIM eta of the decoding: 0 reconstructs the input, larger varies more")] = 1.0,
    seed: Seed = 0,
    batch_size: BatchSize = 16,
    decoder_steps: DecoderSteps = DEFAULT_STEPS,
    decoder_guidance: DecoderGuidance = None,
    variation_guidance: Annotated[Optional[float], typer.Option(
        min=0, help="decoder guidance of the variations' decoding, from z_i alone (default: the model's recorded "
        "one, as evaluate measured them; else the inversion's, --decoder-guidance)")] = None,
    upsampler_steps: UpsamplerSteps = UPSAMPLER_STEPS,
    device: Device = None,
    tracking_uri: TrackingUri = None,
    progress: Progress = True,
) -> None:
    """Variations of images (section 3.1): their CLIP embedding and DDIM-inverted x_T, decoded with eta > 0."""
    with _usage_errors():
        inputs = [_read_image(p) for p in image]
        _check_out(out)
        with _open_stack(model, device, tracking_uri) as stack:
            import torch

            guidance = _manipulation_guidance(stack, decoder_guidance)
            if variation_guidance is None:
                variation_guidance = float(stack.sampling.get("variation_guidance", guidance))
            ups = _upsampler_stages(stack, upsampler_steps)
            generator = _generator(stack, seed)
            rows = []
            for path, picture in zip(image, inputs):
                z_i, x_T = _invert(stack, picture, decoder_steps, guidance)
                drawn = [stack.unclip.variations(z_i, x_T, len(chunk), eta=eta, steps=decoder_steps, guidance_scale=variation_guidance,
                                                 generator=generator, upsamplers=ups)
                         for chunk in _batches(range(n), batch_size, f"varying {path.name}", progress)]
                rows.append((f"{path.name}: {n} variations, eta {eta:g}", [picture, *to_uint8(torch.cat(drawn))]))
            _write(out, rows, stack)


def interpolate(
    model: Model,
    out: Out,
    image: Annotated[list[Path], typer.Option(help="the two images to interpolate between: --image a.png --image b.png")],
    steps: Annotated[int, typer.Option(min=2, help="frames from the first image to the second, both ends included")] = 8,
    seed: Seed = 0,
    batch_size: BatchSize = 16,
    decoder_steps: DecoderSteps = DEFAULT_STEPS,
    decoder_guidance: DecoderGuidance = None,
    upsampler_steps: UpsamplerSteps = UPSAMPLER_STEPS,
    device: Device = None,
    tracking_uri: TrackingUri = None,
    progress: Progress = True,
) -> None:
    """Interpolate between two images (section 3.2): slerp of their CLIP embeddings and of their inverted x_T's."""
    with _usage_errors():
        if len(image) != 2:
            raise UsageError(f"--image: interpolate takes exactly two images, got {len(image)}; pass --image a.png --image b.png")
        a, b = (_read_image(p) for p in image)
        _check_out(out)
        with _open_stack(model, device, tracking_uri) as stack:
            import torch

            guidance = _manipulation_guidance(stack, decoder_guidance)
            ups = _upsampler_stages(stack, upsampler_steps)
            generator = _generator(stack, seed)
            (z_a, x_a), (z_b, x_b) = (_invert(stack, p, decoder_steps, guidance) for p in (a, b))
            thetas = torch.linspace(0, 1, steps).tolist()
            frames = [stack.unclip.interpolate(z_a, z_b, chunk, x_T_a=x_a, x_T_b=x_b, steps=decoder_steps,
                                               guidance_scale=guidance, generator=generator, upsamplers=ups)
                      for chunk in _batches(thetas, batch_size, "interpolating", progress)]
            caption = f"{image[0].name} -> {image[1].name}: {steps} frames"
            _write(out, [(caption, [a, *to_uint8(torch.cat(frames)), b])], stack)


def textdiff(
    model: Model,
    out: Out,
    image: OneImage,
    from_: Annotated[str, typer.Option("--from", help="caption describing the image now, e.g. 'a red circle'")],
    to: Annotated[str, typer.Option("--to", help="caption to move towards, e.g. 'a blue circle'")],
    steps: Annotated[int, typer.Option(min=2, help="frames from theta 0 to --max-theta")] = 6,
    max_theta: Annotated[float, typer.Option(min=0, max=1, help="how far to slerp towards the text diff (paper: 0.25-0.5)")] = 0.5,
    seed: Seed = 0,
    batch_size: BatchSize = 16,
    decoder_steps: DecoderSteps = DEFAULT_STEPS,
    decoder_guidance: DecoderGuidance = None,
    upsampler_steps: UpsamplerSteps = UPSAMPLER_STEPS,
    device: Device = None,
    tracking_uri: TrackingUri = None,
    progress: Progress = True,
) -> None:
    """Edit an image by a text diff (section 3.3): slerp its CLIP embedding towards norm(z_t(to) - z_t(from))."""
    with _usage_errors():
        for option, text in (("--from", from_), ("--to", to)):
            if not text.strip():
                raise UsageError(f"{option}: empty caption; --from describes the image now, --to what it should become")
        picture = _read_image(image)
        _check_out(out)
        with _open_stack(model, device, tracking_uri) as stack:
            import torch

            guidance = _manipulation_guidance(stack, decoder_guidance)
            ups = _upsampler_stages(stack, upsampler_steps)
            generator = _generator(stack, seed)
            z_i, x_T = _invert(stack, picture, decoder_steps, guidance)
            target, base = stack.unclip.encode_text([to]), stack.unclip.encode_text([from_])
            thetas = torch.linspace(0, max_theta, steps).tolist()
            frames = [stack.unclip.text_diff(z_i, x_T, target, base, chunk, steps=decoder_steps, guidance_scale=guidance,
                                             generator=generator, upsamplers=ups)
                      for chunk in _batches(thetas, batch_size, "editing", progress)]
            caption = f"{from_} -> {to} (theta 0 to {max_theta:g})"
            _write(out, [(caption, [picture, *to_uint8(torch.cat(frames))])], stack)


def pca_probe(
    ctx: typer.Context,
    model: Model,
    out: Out,
    image: OneImage,
    dims: Annotated[Optional[list[str]], typer.Option(help="numbers of PCA dimensions to keep: --dims 4 8 16 32 (default: powers of two up to all)")] = None,
    seed: Seed = 0,
    batch_size: BatchSize = 16,
    decoder_steps: DecoderSteps = DEFAULT_STEPS,
    decoder_guidance: DecoderGuidance = None,
    upsampler_steps: UpsamplerSteps = UPSAMPLER_STEPS,
    device: Device = None,
    tracking_uri: TrackingUri = None,
    progress: Progress = True,
) -> None:
    """What the first k principal components of an image's CLIP embedding keep (section 4), decoded with one seed."""
    with _usage_errors():
        ks = _dims(list(dims or []) + list(ctx.args))
        picture = _read_image(image)
        _check_out(out)
        with _open_stack(model, device, tracking_uri) as stack:
            import torch

            if stack.pca is None:
                raise UsageError(f"--model {model}: the stack has no PCA basis (the pca stage's output); run the pca stage")
            available = stack.pca.components.shape[0]
            ks = ks or [2**i for i in range(available.bit_length()) if 2**i < available] + [available]
            if max(ks) > available:
                raise UsageError(f"--dims {max(ks)}: the PCA basis has {available} components; pick dims up to {available}")
            guidance = _manipulation_guidance(stack, decoder_guidance)
            ups = _upsampler_stages(stack, upsampler_steps)
            z_i = _encode_image(stack, picture)
            frames = [stack.unclip.pca_probe(z_i, stack.pca, chunk, seed=seed, steps=decoder_steps, guidance_scale=guidance,
                                             upsamplers=ups)
                      for chunk in _batches(ks, batch_size, "decoding", progress)]
            caption = f"{image.name}: first {', '.join(map(str, ks))} PCA dims"
            _write(out, [(caption, [picture, *to_uint8(torch.cat(frames))])], stack)


# ----- inputs -----------------------------------------------------------------------------------
def _prompts(prompt: list[str] | None, prompt_file: Path | None) -> list[str]:
    prompts = list(prompt or [])
    if any(not p.strip() for p in prompts):
        raise UsageError("--prompt: empty caption; give some text, e.g. --prompt 'a small red circle'")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise UsageError(f"--prompt-file {prompt_file}: {'is a directory, not a file' if prompt_file.is_dir() else 'does not exist'}")
        try:
            lines = prompt_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--prompt-file {prompt_file}: cannot be read as UTF-8 text ({type(e).__name__})") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise UsageError(f"--prompt-file {prompt_file}: no prompts in it; write one caption per line")
        prompts += from_file
    if not prompts:
        raise UsageError("no prompts: give --prompt 'a small red circle' (repeatable) or --prompt-file prompts.txt")
    return prompts


def _read_image(path: Path) -> "Image.Image":
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UsageError(f"--image {path}: {'is a directory, not an image file' if path.is_dir() else 'does not exist'}")
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UsageError(f"--image {path}: cannot be decoded as an image ({reason}); pass a PNG or JPEG file") from None


def _dims(values: list[str]) -> list[int]:
    ks = []
    for value in values:
        for part in filter(None, value.replace(",", " ").split()):
            if not part.isdigit():
                raise UsageError(f"--dims: {part!r} is not a whole number; e.g. --dims 4 8 16 32")
            ks.append(int(part))
    return ks


def _check_out(out: Path) -> None:
    from pipelines.checks import writable_dir_problem

    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the grid is a PNG; name the file *.png")
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory; name a PNG file in it")
    if problem := writable_dir_problem(out.absolute().parent):
        raise UsageError(f"--out {out}: {problem}; pass a path in a writable directory")


@contextmanager
def _open_stack(model: str, device: str | None, tracking_uri: str | None) -> Iterator["Stack"]:
    """The stack behind --model on `device`, with its recorded sampling settings; a registry model's
    download is removed after loading."""
    import torch

    from tasks.stack import StackError, load_stack_parts, recorded_sampling, resolve_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="unclip-model-") as tmp:
        try:
            parts = resolve_model(model, tmp, tracking_uri)
            sampling = recorded_sampling(tmp if model.startswith("models:/") else model)
            stack = load_stack_parts(parts, device=device, sampling=sampling)
        except StackError as e:
            raise UsageError(f"--model {model}: {e}") from None
    with torch.inference_mode():
        yield stack


def _manipulation_guidance(stack: "Stack", given: float | None) -> float:
    """The decoder guidance of vary, interpolate, textdiff and pca-probe: the option, else the
    guidance the run recorded (evaluate measured its variations at it), else 1."""
    return float(given if given is not None else stack.sampling.get("decoder_guidance", 1.0))


def _prior_kwargs(stack: "Stack", steps: int, guidance: float, steps_given: bool) -> dict:
    from models.ar_prior import ARPrior

    if isinstance(stack.unclip.prior, ARPrior):
        if steps_given:
            raise UsageError("--prior-steps: this model's prior is autoregressive (one token per PCA dimension, no steps); drop the option")
        return {"guidance_scale": float(guidance)}
    return {"guidance_scale": float(guidance), "steps": int(steps)}


def _upsampler_stages(stack: "Stack", steps: int) -> list:
    from models.unclip import Stage

    return [Stage(steps=steps)] * len(stack.unclip.upsamplers)


def _generator(stack: "Stack", seed: int) -> "torch.Generator":
    import torch

    device = next(stack.unclip.decoder.parameters()).device
    return torch.Generator(device=device).manual_seed(seed)


def _encode_image(stack: "Stack", picture: "Image.Image") -> "torch.Tensor":
    """z_i (1, D) by the stack's CLIP, with its own preprocessing."""
    import numpy as np

    clip = stack.clip
    return clip.encode_image(clip.normalize(np.stack([clip.preprocess_uint8(picture)])))


def _invert(stack: "Stack", picture: "Image.Image", steps: int, guidance: float):
    """(z_i, x_T) of an image: its CLIP embedding, and DDIM inversion of the decoder conditioned on it
    from the image center-cropped to the decoder's size."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    size = stack.unclip.decoder.config.image_size
    square = ImageOps.fit(picture, (size, size), Image.Resampling.BICUBIC)
    device = next(stack.unclip.decoder.parameters()).device
    x0 = torch.from_numpy(np.asarray(square, dtype=np.float32)).permute(2, 0, 1)[None].to(device) / 127.5 - 1
    z_i = _encode_image(stack, picture).to(device)
    return z_i, stack.unclip.invert(x0, z_i, steps=steps, guidance_scale=guidance)


# ----- outputs ----------------------------------------------------------------------------------
def _batches(items: Sequence, size: int, label: str, progress: bool) -> Iterator[list]:
    """`items` in chunks of `size`, with a progress bar (on stderr) over the chunks."""
    from rich.console import Console
    from rich.progress import track

    chunks = [list(items[i:i + size]) for i in range(0, len(items), size)]
    console = Console(stderr=True)
    yield from track(chunks, description=label, console=console, transient=True, disable=not (progress and console.is_terminal))


def _write(out: Path, rows: list, stack: "Stack") -> None:
    from tasks.grids import captioned_grid

    grid = captioned_grid(rows, tile=stack.image_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, format="PNG")
    cols = max(len(images) for _, images in rows)
    typer.echo(f"wrote {out} ({len(rows)} row{'s' * (len(rows) != 1)} of {cols} images, {stack.image_size} px, {grid.width}x{grid.height})")
