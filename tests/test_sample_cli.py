"""unclip sample | vary | interpolate | textdiff | pca-probe on a tiny trained stack: each writes a
PNG grid of the expected size (tiles of the stack's output size, a caption band under each row),
from a storage directory or a registry URI; bad models, images and prompts exit 2 with a message
naming the option, no traceback and no file written.

The stack is laid out as the stages write it (embed/clip, pca/, train_*/ema) with tiny models
trained for a few steps in this process (the stages' own Ray runs take minutes)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from models import checkpoint
from models.ar_prior import ARPrior
from models.decoder import Decoder
from models.decoder import training_loss as decoder_loss
from models.pca import fit_pca
from models.prior import DiffusionPrior
from models.prior import training_loss as prior_loss
from models.sizes import config_for
from models.upsampler import Upsampler, downsample_to
from models.upsampler import training_loss as upsampler_loss
from pipelines.cli import app
from tasks.embed import EmbedConfig, resolve_clip_spec
from tasks.grids import CAPTION_BAND
from tasks.schema import CLIP_DIR, CLIP_SPEC_NAME, load_embedding_clip, load_pca, save_pca
from tasks.shapes import render, sample_scene

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 64  # the upsampler's output: every tile of every grid
FAST = ["--decoder-steps", "3", "--upsampler-steps", "2", "--seed", "0"]


def train(model, loss_fn, data: dict, steps: int, batch: int = 8):
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n = next(iter(data.values())).shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        loss, _ = loss_fn(model, {k: v[idx] for k, v in data.items()}, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stack")
    (root / "embed" / CLIP_DIR).mkdir(parents=True)
    spec = resolve_clip_spec(EmbedConfig(clip_arch="tiny", clip_pretrained=None), root / "embed", root, seed=0)
    (root / "embed" / CLIP_DIR / CLIP_SPEC_NAME).write_text(json.dumps(spec))
    clip = load_embedding_clip(root / "embed")

    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(48)]
    pictures = [render(objects, SIZE) for objects, _ in scenes]
    tokens = clip.tokenize([caption for _, caption in scenes])
    with torch.no_grad():
        z_i = clip.encode_image(clip.normalize(np.stack([clip.preprocess_uint8(p) for p in pictures])))
        z_t, states = clip.encode_text_with_hidden(tokens)
    text = {"text_emb": z_t, "text_states": states, "text_mask": tokens != 0}
    save_pca(fit_pca(z_i, 16, 16, (z_i * z_t).sum(-1), 8), root / "pca")

    dims = dict(embed_dim=clip.embed_dim, text_dim=clip.text_width)
    torch.manual_seed(0)
    prior = DiffusionPrior(config_for("prior", "tiny", text_len=clip.context_length, **dims))
    checkpoint.save(train(prior, prior_loss, {"image_emb": z_i, **text}, 20), root / "train_prior" / "ema")
    x = torch.from_numpy(np.stack([np.asarray(p, np.float32) for p in pictures])).permute(0, 3, 1, 2) / 127.5 - 1
    decoder = Decoder(config_for("decoder", "tiny", image_size=32, **dims))
    checkpoint.save(train(decoder, decoder_loss, {"image": downsample_to(x, 32), "image_emb": z_i, **text}, 8), root / "train_decoder" / "ema")
    upsampler = Upsampler(config_for("upsampler", "tiny", image_size=SIZE, low_res_size=32))
    checkpoint.save(train(upsampler, upsampler_loss, {"image": x}, 8), root / "train_upsampler" / "ema")
    for i in (0, 1):
        pictures[i].save(root / f"in{i}.png")
    return root


@pytest.fixture(scope="module")
def ar_storage(storage, tmp_path_factory) -> Path:
    """The same stack with an AR prior (sampled with its key/value cache)."""
    root = tmp_path_factory.mktemp("ar_stack")
    for part in ("embed", "pca", "train_decoder", "train_upsampler"):
        (root / part).symlink_to(storage / part)
    clip = load_embedding_clip(storage / "embed")
    torch.manual_seed(0)
    prior = ARPrior.from_basis(load_pca(storage / "pca"), "tiny", text_dim=clip.text_width, text_len=clip.context_length)
    checkpoint.save(prior.eval(), root / "train_prior" / "ema")
    return root


def unclip(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def grid(path: Path, rows: int, cols: int) -> np.ndarray:
    """The PNG at `path`, checked: rows x cols tiles of SIZE px, a caption band with text under each row."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (cols * SIZE, rows * (SIZE + CAPTION_BAND))
        pixels = np.asarray(image.convert("RGB"))
    for r in range(rows):
        band = pixels[r * (SIZE + CAPTION_BAND) + SIZE:(r + 1) * (SIZE + CAPTION_BAND)]
        assert (band < 100).all(-1).sum() > 20, f"no caption text under row {r}"
    return pixels


def tiles(pixels: np.ndarray, row: int) -> list[np.ndarray]:
    top = row * (SIZE + CAPTION_BAND)
    return [pixels[top:top + SIZE, c:c + SIZE] for c in range(0, pixels.shape[1], SIZE)]


# ----- every command writes its grid ------------------------------------------------------------
def test_sample_prompts_and_prompt_file(storage, tmp_path):
    (tmp_path / "prompts.txt").write_text("a small red circle\n\n  a blue square left of a green triangle  \n")
    out = tmp_path / "grid.png"
    result = unclip("sample", "--model", storage, "--prompt", "a yellow star", "--prompt-file", tmp_path / "prompts.txt",
                    "--n", 3, "--batch-size", 4, "--prior-steps", 3, "--prior-guidance", 2, "--decoder-guidance", 3, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    pixels = grid(out, rows=3, cols=3)
    assert "3 rows of 3 images" in result.stdout
    drawn = [t for r in range(3) for t in tiles(pixels, r)]
    assert all(t.std() > 1 for t in drawn)
    assert len({t.tobytes() for t in drawn}) == 9  # every image its own noise


def test_same_seed_same_grid_other_seed_other_grid(storage, tmp_path):
    def draw(name, seed):
        result = unclip("sample", "--model", storage, "--prompt", "a red circle", "--n", 2, "--prior-steps", 2,
                        "--decoder-steps", 3, "--upsampler-steps", 2, "--seed", seed, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        return (tmp_path / name).read_bytes()

    assert draw("a.png", 0) == draw("b.png", 0) != draw("c.png", 1)


def recorded_run(storage: Path, tmp_path: Path, decoder_guidance: float, decoder_eta: float = 0.0,
                 variation_guidance: float | None = None) -> Path:
    """A run directory over the fixture's parts whose config records sampling settings (evaluate's
    decoder guidance and eta, register.sampling's fast steps)."""
    from pipelines.config import validate

    run = tmp_path / "run"
    run.mkdir(parents=True)
    for part in ("embed", "pca", "train_prior", "train_decoder", "train_upsampler"):
        (run / part).symlink_to(storage / part)
    cfg = validate({"evaluate": {"decoder_guidance": decoder_guidance, "decoder_eta": decoder_eta,
                                 "variation_guidance": variation_guidance},
                    "register": {"sampling": {"prior_steps": 3, "prior_guidance": 2, "decoder_steps": 3, "upsampler_steps": 2}}})
    (run / "_pipeline").mkdir()
    (run / "_pipeline" / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return run


def test_sample_defaults_to_the_runs_recorded_settings(storage, tmp_path):
    """Without sampling options, `sample` draws with the run's register.sampling (what the registered
    model serves; its decoder guidance and eta are evaluate's), not Karlo's settings."""
    run = recorded_run(storage, tmp_path, decoder_guidance=1.5, decoder_eta=1.0)
    explicit = ["--prior-steps", 3, "--prior-guidance", 2, "--decoder-steps", 3, "--decoder-guidance", 1.5, "--upsampler-steps", 2]
    drawn = {}
    for name, model, options in (
            ("recorded", run, []),
            ("explicit", storage, [*explicit, "--decoder-eta", 1]),
            ("eta_0", storage, [*explicit, "--decoder-eta", 0]),
            ("karlo", storage, ["--prior-steps", 3, "--decoder-steps", 3, "--upsampler-steps", 2])):
        out = tmp_path / f"{name}.png"
        result = unclip("sample", "--model", model, "--prompt", "a red circle", "--n", 2, "--seed", 0, *options, "--out", out)
        assert result.exit_code == 0, result.output
        drawn[name] = grid(out, rows=1, cols=2)
    assert np.array_equal(drawn["recorded"], drawn["explicit"])
    assert not np.array_equal(drawn["recorded"], drawn["eta_0"])  # ancestral steps draw other images
    assert not np.array_equal(drawn["recorded"], drawn["karlo"])  # guidance 4 and 8 draw other images


def test_sample_with_the_autoregressive_prior(ar_storage, tmp_path):
    result = unclip("sample", "--model", ar_storage, "--prompt", "a red circle", "--n", 2, "--prior-guidance", 3, *FAST, "--out", tmp_path / "g.png")
    assert result.exit_code == 0, result.output
    grid(tmp_path / "g.png", rows=1, cols=2)
    result = unclip("sample", "--model", ar_storage, "--prompt", "a red circle", "--prior-steps", 4, "--out", tmp_path / "h.png")
    assert result.exit_code == 2 and "--prior-steps" in result.stderr and "autoregressive" in result.stderr


def test_vary(storage, tmp_path):
    out = tmp_path / "vary.png"
    result = unclip("vary", "--model", storage, "--image", storage / "in0.png", "--image", storage / "in1.png",
                    "--eta", 0.5, "--n", 3, "--batch-size", 2, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    pixels = grid(out, rows=2, cols=1 + 3)
    for r in (0, 1):  # each row starts with its input
        np.testing.assert_array_equal(tiles(pixels, r)[0], np.asarray(Image.open(storage / f"in{r}.png").convert("RGB")))


def test_vary_defaults_to_the_runs_recorded_decoder_guidance(storage, tmp_path):
    """Variations (and their inversion) at the guidance evaluate measured them with; 1 without a record."""
    run = recorded_run(storage, tmp_path, decoder_guidance=2.0)
    varied_more = recorded_run(storage, tmp_path / "more", decoder_guidance=2.0, variation_guidance=3.0)
    drawn = {}
    for name, model, options in (("recorded", run, []), ("explicit_2", storage, ["--decoder-guidance", 2]),
                                 ("explicit_1", storage, ["--decoder-guidance", 1]), ("unrecorded", storage, []),
                                 ("recorded_3", varied_more, []),
                                 ("explicit_2_3", storage, ["--decoder-guidance", 2, "--variation-guidance", 3])):
        out = tmp_path / f"{name}.png"
        result = unclip("vary", "--model", model, "--image", storage / "in0.png", "--n", 2, *FAST, *options, "--out", out)
        assert result.exit_code == 0, result.output
        drawn[name] = grid(out, rows=1, cols=3)
    assert np.array_equal(drawn["recorded"], drawn["explicit_2"])
    assert np.array_equal(drawn["unrecorded"], drawn["explicit_1"])
    assert not np.array_equal(drawn["recorded"], drawn["explicit_1"])
    # evaluate's variation_guidance decodes the variations (the inversion stays at decoder_guidance)
    assert np.array_equal(drawn["recorded_3"], drawn["explicit_2_3"])
    assert not np.array_equal(drawn["recorded_3"], drawn["recorded"])


def test_interpolate(storage, tmp_path):
    out = tmp_path / "interp.png"
    result = unclip("interpolate", "--model", storage, "--image", storage / "in0.png", "--image", storage / "in1.png",
                    "--steps", 5, "--batch-size", 2, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    pixels = grid(out, rows=1, cols=5 + 2)  # the two inputs at the ends
    row = tiles(pixels, 0)
    np.testing.assert_array_equal(row[-1], np.asarray(Image.open(storage / "in1.png").convert("RGB")))


def test_textdiff(storage, tmp_path):
    out = tmp_path / "diff.png"
    result = unclip("textdiff", "--model", storage, "--image", storage / "in0.png", "--from", "a red circle",
                    "--to", "a blue circle", "--steps", 4, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    grid(out, rows=1, cols=1 + 4)


def test_pca_probe(storage, tmp_path):
    out = tmp_path / "probe.png"
    result = unclip("pca-probe", "--model", storage, "--image", storage / "in0.png", "--dims", 4, 8, 16, 32, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    grid(out, rows=1, cols=1 + 4)
    # default dims: powers of two up to all components of the basis (the tiny CLIP's width)
    components = load_pca(storage / "pca").components.shape[0]
    result = unclip("pca-probe", "--model", storage, "--image", storage / "in0.png", "--batch-size", 3, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    grid(out, rows=1, cols=1 + len([k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if k < components]) + 1)


def test_registry_uri(storage, tmp_path, monkeypatch):
    """The stack logged and registered as the register stage does it (tasks.register): models:/name@alias
    and models:/name/version both sample, by default with the settings registered with them
    (register.sampling); an unknown name or alias is a clear error."""
    import mlflow

    from tasks.register import RegisterConfig, SamplingDefaults, log_stack_model
    from tasks.stack import stack_parts

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, previous = f"sqlite:///{tmp_path}/mlflow.db", mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("sample-cli")
        (tmp_path / "work").mkdir()
        with mlflow.start_run():
            sampling = SamplingDefaults(prior_steps=3, prior_guidance=2, decoder_steps=3, decoder_guidance=1.5, decoder_eta=1.0,
                                        upsampler_steps=2)
            info = log_stack_model(stack_parts(storage), RegisterConfig(sampling=sampling), tmp_path / "work")
        version = mlflow.register_model(info.model_uri, "tiny").version
        MlflowClient(uri).set_registered_model_alias("tiny", "champion", version)
    finally:
        mlflow.set_tracking_uri(previous)
    explicit = ["--prior-steps", 3, "--prior-guidance", 2, "--decoder-steps", 3, "--decoder-guidance", 1.5, "--decoder-eta", 1,
                "--upsampler-steps", 2]
    assert unclip("sample", "--model", storage, "--prompt", "a red circle", "--n", 2, "--seed", 0, *explicit,
                  "--out", tmp_path / "explicit.png").exit_code == 0
    for model in ("models:/tiny@champion", f"models:/tiny/{version}"):
        out = tmp_path / "g.png"
        result = unclip("sample", "--model", model, "--tracking-uri", uri, "--prompt", "a red circle", "--n", 2, "--seed", 0, "--out", out)
        assert result.exit_code == 0, result.output
        assert np.array_equal(grid(out, rows=1, cols=2), grid(tmp_path / "explicit.png", rows=1, cols=2))
        out.unlink()
    for model, reason in (("models:/tiny@nope", "nope"), ("models:/other/1", "other")):
        message = fails("sample", "--model", model, "--tracking-uri", uri, "--prompt", "x", "--out", tmp_path / "g.png")
        assert f"--model {model}: cannot fetch it from the model registry at {uri}" in message and reason in message
        assert "MLFLOW_TRACKING_URI" in message


# ----- errors -----------------------------------------------------------------------------------
def fails(*args) -> str:
    """`unclip *args` must exit 2 with one message on stderr, no traceback, and write nothing."""
    out = Path(str(args[args.index("--out") + 1]))
    result = unclip(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert not out.exists()
    return result.stderr


def test_bad_models(storage, tmp_path):
    out = tmp_path / "g.png"
    sample = lambda model: fails("sample", "--model", model, "--prompt", "a red circle", "--out", out)
    message = sample(tmp_path / "missing")
    assert f"--model {tmp_path / 'missing'}: no such directory" in message and "models:/name@alias" in message
    (tmp_path / "file").write_text("x")
    assert "is a file, not a directory" in sample(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    message = sample(tmp_path / "empty")
    assert "has no trained clip" in message and "prior" in message and "decoder" in message and "unclip run" in message
    (tmp_path / "no_decoder").mkdir()
    for part in ("embed", "train_prior"):
        (tmp_path / "no_decoder" / part).symlink_to(storage / part)
    message = sample(tmp_path / "no_decoder")
    assert "has no trained decoder" in message and "prior" not in message.split("has no trained")[1]
    assert "not a storage directory or a registry URI" in sample("s3://bucket/run")
    assert "not a storage directory or a registry URI" in sample("models:unclip")


def test_bad_inputs(storage, tmp_path):
    out = tmp_path / "g.png"
    model = ["--model", storage, "--out", out]
    message = fails("vary", *model, "--image", tmp_path / "none.png")
    assert f"--image {tmp_path / 'none.png'}: does not exist" in message
    (tmp_path / "text.png").write_text("not an image")
    message = fails("textdiff", *model, "--image", tmp_path / "text.png", "--from", "a", "--to", "b")
    assert f"--image {tmp_path / 'text.png'}: cannot be decoded as an image" in message
    assert "exactly two images, got 1" in fails("interpolate", *model, "--image", storage / "in0.png")
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert f"--prompt-file {tmp_path / 'empty.txt'}: no prompts in it" in fails("sample", *model, "--prompt-file", tmp_path / "empty.txt")
    assert "--prompt-file" in fails("sample", *model, "--prompt-file", tmp_path / "none.txt")
    assert "no prompts: give --prompt" in fails("sample", *model)
    assert "--dims: 'x' is not a whole number" in fails("pca-probe", *model, "--image", storage / "in0.png", "--dims", 4, "x")
    assert "the PCA basis has" in fails("pca-probe", *model, "--image", storage / "in0.png", "--dims", 4, 100000)
    assert "--out" in fails("sample", "--model", storage, "--prompt", "x", "--out", tmp_path / "g.jpg")
    assert "--from: empty caption" in fails("textdiff", *model, "--image", storage / "in0.png", "--from", " ", "--to", "b")


def test_find_parts_in_downloaded_layouts(storage, tmp_path):
    """What a registry download may hold: a pyfunc model (its MLmodel names where each part went;
    MLflow renames colliding folders), a run's storage layout, or part folders by name."""
    import shutil

    from tasks.stack import StackError, find_parts, load_stack_parts, stack_parts

    expected = stack_parts(storage)
    model = tmp_path / "pyfunc" / "model"
    names = {"clip": "clip", "prior": "ema", "decoder": "ema_1", "upsampler": "ema_2", "pca": "pca"}
    for part, folder in names.items():
        shutil.copytree(expected[part], model / "artifacts" / folder)
    artifacts = "".join(f"      {part}:\n        path: artifacts/{folder}\n        uri: {expected[part]}\n" for part, folder in names.items())
    (model / "MLmodel").write_text(f"flavors:\n  python_function:\n    loader_module: mlflow.pyfunc.model\n    artifacts:\n{artifacts}")
    parts = find_parts(tmp_path / "pyfunc")
    assert parts == {**{part: None for part in expected}, **{part: model / "artifacts" / folder for part, folder in names.items()}}
    stack = load_stack_parts(parts)
    assert stack.image_size == SIZE and stack.pca is not None

    (tmp_path / "copy").mkdir()
    shutil.copytree(storage, tmp_path / "copy" / "run", symlinks=True)
    assert find_parts(tmp_path / "copy") == stack_parts(tmp_path / "copy" / "run")

    shutil.rmtree(model / "artifacts" / "ema_1")
    with pytest.raises(StackError, match=r"MLflow model with artifacts .* not a complete unCLIP stack; missing decoder"):
        find_parts(tmp_path / "pyfunc")
    (tmp_path / "bare" / "decoder").mkdir(parents=True)
    with pytest.raises(StackError, match=r"holds no unCLIP stack.*missing clip, prior, decoder \(found: none\)"):
        find_parts(tmp_path / "bare")


def test_a_registered_models_files_are_found_where_its_store_moved(tmp_path):
    """MLflow records absolute artifact paths: in a storage moved as a whole, the registry names a
    folder that is gone, and the same place below the moved store's mlruns/ is used instead."""
    from tasks.stack import moved_with_the_store

    moved = tmp_path / "moved"
    (moved / "mlruns" / "1" / "models" / "m-1" / "artifacts").mkdir(parents=True)
    store = f"sqlite:///{moved}/mlflow.db"
    gone = "file:///old/place/mlruns/1/models/m-1/artifacts"
    assert moved_with_the_store(gone, store) == (moved / "mlruns/1/models/m-1/artifacts").as_uri()
    assert moved_with_the_store("/old/place/mlruns/1/models/m-1/artifacts", store).startswith(moved.as_uri())
    here = (moved / "mlruns" / "1").as_uri()  # a copy: the recorded folder still exists
    assert moved_with_the_store(here, f"sqlite:///{tmp_path}/elsewhere/mlflow.db") == here
    for source, uri in ((gone, "http://127.0.0.1:5000"), ("s3://bucket/mlruns/1/models/m-1/artifacts", store),
                        ("file:///old/place/mlruns/2/models/m-9/artifacts", store)):
        assert moved_with_the_store(source, uri) == source  # a server, a remote store, nothing there
