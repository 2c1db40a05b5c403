"""evaluate stage: the metrics against independent references, and the whole stage on a tiny
trained stack (real embed stage, models trained a few steps in-process, real Ray Data actors,
real MLflow)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks import metrics
from tests.mlflow_helpers import use_sqlite_store

QUICK = Path(__file__).parents[1] / "pipelines" / "configs" / "quick.yaml"


# ---------------------------------------------------------------------------------------------
# Metrics against references


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The FID formula written out with scipy's matrix square root (Heusel et al. 2017)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    d = 16
    a = rng.normal(size=(400, d)) @ rng.normal(size=(d, d)) * 0.5
    b = rng.normal(size=(300, d)) @ rng.normal(size=(d, d)) * 0.7 + 0.3
    expected = scipy_frechet(a, b)
    assert expected > 1.0
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, abs=1e-3)
    # from cached statistics (what real_stats/ keeps) the same number
    stats = metrics.FeatureStats.from_tensors(metrics.FeatureStats.of(a).tensors("x_"), "x_")
    assert metrics.frechet_distance(stats, b) == pytest.approx(expected, abs=1e-3)
    assert metrics.frechet_distance(a[:200], a[200:]) < 0.1 * expected


def test_fd_order_share_is_sure_of_a_clear_gap_only_on_enough_captions():
    rng = np.random.default_rng(2)
    real, a = rng.normal(size=(1000, 8)), rng.normal(size=(400, 8))
    assert metrics.fd_order_share(real, a, a + 0.5) == 1.0  # a shifted copy is farther in every resample
    assert metrics.fd_order_share(real, a + 0.5, a) == 0.0
    assert metrics.fd_order_share(real, a, a) == 0.0  # a tie is not closer
    worse = a + np.random.default_rng(12).normal(size=a.shape) * 0.5 + 0.05  # the same captions, drawn a little worse
    few, many = (metrics.fd_order_share(real, a[:n], worse[:n], resamples=100) for n in (20, 400))
    assert 0.05 < few < 0.95 and many == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        metrics.fd_order_share(real, a, a[:10])


def test_aesthetic_probe_recovers_a_planted_linear_rating():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(600, 32))
    features /= np.linalg.norm(features, axis=1, keepdims=True)  # the probe reads unit-norm CLIP embeddings
    w = rng.normal(size=32)
    ratings = 5.0 + features @ w + 0.02 * rng.normal(size=600)
    probe = metrics.fit_probe(features, ratings, alpha=1e-3)
    assert probe.r2 >= 0.9
    fresh = rng.normal(size=(100, 32))
    fresh /= np.linalg.norm(fresh, axis=1, keepdims=True)
    assert np.corrcoef(probe.predict(fresh), 5.0 + fresh @ w)[0, 1] > 0.95


def test_stand_in_rating_grows_with_the_shapes():
    from tasks.shapes import ShapeObject

    def scene(*objects):
        return json.dumps([o.__dict__ for o in objects])

    small = metrics.stand_in_rating(scene(ShapeObject("red", "square", "small", 0.5, 0.5)))
    large = metrics.stand_in_rating(scene(ShapeObject("red", "square", "large", 0.5, 0.5)))
    two = metrics.stand_in_rating(scene(ShapeObject("red", "square", "large", 0.27, 0.5), ShapeObject("blue", "square", "large", 0.73, 0.5)))
    assert 0 < small < large < two <= 10
    assert large == pytest.approx(10 * (2 * 0.9 * 0.19) ** 2, rel=0.1)  # a square of side 2 x 0.9 x 0.19


def test_high_frequency_share_sees_detail_above_the_cutoff_only():
    from PIL import Image

    y, x = np.mgrid[0:64, 0:64]
    stripes = lambda cycles: np.repeat((127 + 100 * np.cos(2 * np.pi * cycles * x / 64))[None, ..., None], 3, -1)  # noqa: E731
    assert metrics.high_frequency_share(stripes(24), 0.25) == pytest.approx(1.0)  # 24/64 = 0.375 cycles per pixel
    assert metrics.high_frequency_share(stripes(8), 0.25) == pytest.approx(0.0, abs=1e-12)  # 0.125
    # a sharp square loses its detail above the 32-px Nyquist when it goes down to 32 px and back by bicubic
    square = np.full((1, 64, 64, 3), 230, np.uint8)
    square[0, 20:44, 20:44] = (200, 30, 30)
    small = np.asarray(Image.fromarray(square[0]).resize((32, 32), Image.Resampling.BICUBIC))[None]
    assert metrics.high_frequency_share(metrics.bicubic_to(small, 64), 0.25) < 0.3 * metrics.high_frequency_share(square, 0.25)


def test_bars_compare_with_numbers_and_metrics_and_name_what_is_missing():
    from tasks import evaluate

    values = {"a/acc": 0.96, "a/fd": 0.5, "a/fd_text": 0.8}
    results = evaluate.check_bars(["a/acc >= 0.95", "a/fd < a/fd_text", "a/acc>0.99", "a/psnr >= 30"], values)
    assert [r["passed"] for r in results] == [True, True, False, False]
    assert results[1]["threshold"] == 0.8 and results[3]["missing"] == ["a/psnr"]
    with pytest.raises(ValueError, match="is not '<metric> <op>"):
        evaluate.EvaluateConfig(bars=["a/acc = 1"])


def test_headline_prompts_measure_the_stack_and_z_t_on_one_image_per_caption():
    """With headline_prompts, the first split's stack and z_t draw one image for each of that many
    captions and their headline metrics come from those images alone (fd against scipy's formula);
    diversity and the guidance sweep keep num_prompts x samples_per_prompt, as the other splits."""
    from tasks import evaluate

    rng = np.random.default_rng(0)
    n, d = 40, 4
    data = {split: evaluate.SplitData(split, [f"{i:03d}" for i in range(n)], [f"caption {i}" for i in range(n)],
                                      rng.normal(size=(n, d)), rng.normal(size=(n, d)), np.zeros((n, 8, 8, 3), np.uint8),
                                      None, rng.normal(size=(n, d)))
            for split in ("heldout", "validation")}
    cfg = evaluate.EvaluateConfig(num_prompts=3, samples_per_prompt=2, headline_prompts=20, decoder_guidance=2.0,
                                  decoder_guidance_scales=[1.0, 2.0])
    jobs = evaluate.make_jobs(cfg, data, seed=0)
    count = lambda split, mode, g: sum(j.split == split and j.mode == mode and j.guidance == g for j in jobs)  # noqa: E731
    assert [count("heldout", "stack", 2.0), count("heldout", "text_emb", 2.0), count("heldout", "stack", 1.0),
            count("validation", "stack", 2.0)] == [3 * 2 + 17, 3 * 2 + 17, 6, 6]
    drawn = {"clip": rng.normal(size=(len(jobs), d)), "image": np.zeros((len(jobs), 8, 8, 3), np.uint8),
             "z_hat": rng.normal(size=(len(jobs), d))}
    drawn["base"] = drawn["image"]
    drawn["clip"][[j.job for j in jobs if j.mode == "text_emb"]] += 3.0  # z_t decoded: far from the real images
    m = evaluate.split_metrics(cfg, data["heldout"], jobs, drawn, None, True, 64)

    def drawn_by(mode: str, keep) -> list[int]:
        return [j.job for j in jobs if j.split == "heldout" and j.mode == mode and j.guidance == 2.0 and keep(j)]

    real = data["heldout"].clip
    one_each, headline = drawn_by("stack", lambda j: j.sample == 0), drawn_by("stack", lambda j: j.prompt < 3)
    assert len(one_each) == 20 and m["headline_prompts"] == 20
    assert m["fd_clip"] == pytest.approx(scipy_frechet(real, drawn["clip"][one_each]), rel=1e-4)
    zt = drawn_by("text_emb", lambda j: j.sample == 0)
    assert m["fd_clip_text_emb"] == pytest.approx(scipy_frechet(real, drawn["clip"][zt]), rel=1e-4)
    assert m["fd_clip_below_text_emb_share"] == 1.0  # the stack is closer in every resample
    assert m["clip_score"] == pytest.approx(metrics.mean_cosine(drawn["clip"][one_each], data["heldout"].text_emb[:20]))
    assert m["prior_cos_image"] == pytest.approx(metrics.mean_cosine(drawn["z_hat"][one_each], data["heldout"].image_emb[:20]))
    assert m["guidance_2/fd_clip"] == pytest.approx(scipy_frechet(real, drawn["clip"][headline]), rel=1e-4)
    assert m["diversity"] == m["guidance_2/diversity"] == pytest.approx(
        metrics.diversity(drawn["clip"][headline], np.array([0, 0, 1, 1, 2, 2])))
    assert "headline_prompts" not in evaluate.split_metrics(cfg, data["validation"], jobs, drawn, None, False, 64)


def test_diversity_and_clip_score():
    same = np.tile([[1.0, 0.0]], (4, 1))
    assert metrics.diversity(same, np.array([0, 0, 1, 1])) == pytest.approx(0.0)
    opposite = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert metrics.diversity(opposite, np.array([0, 0, 1, 1])) == pytest.approx(1.0)  # (2 + 0) / 2
    assert metrics.mean_cosine(np.array([[3.0, 0.0]]), np.array([[1.0, 1.0]])) == pytest.approx(2 ** -0.5)


def test_precision_recall_on_a_hand_checked_case():
    # real: 0, 1, 2, 3 on a line; with k = 1 each real ball has radius 1 (its nearest neighbour).
    # generated: 0.5 (inside the balls of 0 and 1) and 10 (in none): precision 1/2. Each generated
    # ball has radius 9.5 (the other generated point), which covers every real point: recall 1.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    generated = np.array([[0.5], [10.0]])
    assert metrics.precision_recall(generated, real, k=1) == {"precision": 0.5, "recall": 1.0}
    # swapped roles: 0..3 as generated (radius 1) cover only 0.5 of the two "real" points; the
    # "real" balls (radius 9.5) cover all four generated ones
    assert metrics.precision_recall(real, generated, k=1) == {"precision": 1.0, "recall": 0.5}
    # a far-off generated cluster: nothing inside the real balls, no real point inside its balls
    far = np.array([[100.0], [100.5], [101.0], [101.5]])
    assert metrics.precision_recall(far, real, k=1) == {"precision": 0.0, "recall": 0.0}
    with pytest.raises(ValueError, match="more than 3"):
        metrics.precision_recall(generated, real)


# ---------------------------------------------------------------------------------------------
# FID's Inception from a local file


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """A randomly initialised FID Inception saved as safetensors (the format the loader takes)."""
    from safetensors.torch import save_file
    from torch_fidelity import feature_extractor_inceptionv3 as module

    # build the network without its weights (its constructor would download them), keep the random init
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        network = module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
    return path


def test_inception_loads_a_local_safetensors_file(inception_file):
    from safetensors.torch import load_file

    network = metrics.inception_network(inception_file)
    saved = load_file(str(inception_file))
    assert torch.equal(network.state_dict()["Conv2d_1a_3x3.conv.weight"], saved["Conv2d_1a_3x3.conv.weight"])
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        features = network(images)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()


def test_inception_refuses_missing_or_foreign_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(metrics.InceptionWeightsError, match="does not exist.*inception_weights"):
        metrics.inception_network(tmp_path / "nope.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(metrics.InceptionWeightsError, match="does not hold FID Inception-v3 weights"):
        metrics.inception_network(tmp_path / "other.safetensors")


def test_missing_inception_weights_exit_2_before_the_run(tmp_path):
    missing = tmp_path / "inception.safetensors"
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "validate", str(QUICK), "--check-paths",
                             "--storage", str(tmp_path / "run"), "--set", f"evaluate.inception_weights={missing}"],
                            capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 2, result.stderr
    assert "evaluate.inception_weights" in result.stderr and "does not exist" in result.stderr
    assert "safetensors" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# The stage on a tiny trained stack


def write_scene_shards(directory: Path, shards: int, per_shard: int, size: int = 64) -> None:
    """Ingest-like shards of the synthetic shapes, with the synth stage's `split` and `objects` in the json."""
    import random

    from tasks.shapes import render, sample_scene, split_of

    rng = random.Random(0)
    directory.mkdir(parents=True)
    for shard in range(shards):
        with tarfile.open(directory / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                objects, caption = sample_scene(rng, two_object_fraction=0.4)
                buf = io.BytesIO()
                render(objects, size).save(buf, format="JPEG", quality=95)
                meta = {"key": key, "caption": caption, "split": split_of(objects), "status": "success",
                        "objects": json.dumps([o.__dict__ for o in objects])}
                for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", caption.encode()),
                                   (f"{key}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def train_briefly(kind: str, config: dict, batches: list[dict], steps: int = 4):
    """A few AdamW steps of the kind's own objective, in process (the stages' loop needs Ray Train)."""
    from models import sizes

    torch.manual_seed(0)
    network = sizes.build_from_config(kind, config)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        loss, _ = sizes.objective(kind)(network, batches[step % len(batches)], generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return network.eval()


@pytest.fixture(scope="module")
def stack_storage(ray_local, tmp_path_factory) -> Path:
    """<storage>/{ingest,embed,train_prior/ema,train_decoder/ema,train_upsampler/ema}."""
    import dataclasses

    import pyarrow.parquet as pq
    from PIL import Image

    from models import checkpoint, sizes
    from tasks import train_decoder, train_prior
    from tasks.captions import CaptionEncoder
    from tasks.context import StageContext
    from tasks.embed import EmbedConfig
    from tasks.embed import run as embed
    from tasks.schema import iter_tar_samples, list_embedding_files, to_matrix

    torch.set_num_threads(1)
    storage = tmp_path_factory.mktemp("stack")
    ingest, embed_dir = storage / "ingest", storage / "embed"
    write_scene_shards(ingest, 2, 60)
    embed_dir.mkdir()
    embed(EmbedConfig(clip_arch="tiny", clip_pretrained=None, batch_size=64),
          StageContext("embed", storage, embed_dir, {"ingest": ingest}, seed=0, show_progress=False))

    table = pq.read_table([str(p) for p in list_embedding_files(embed_dir)][0])
    images = {k: np.asarray(Image.open(io.BytesIO(f["jpg"])).convert("RGB"))
              for k, f in (item for item in iter_tar_samples(str(ingest / "00000.tar")))}
    keys = table["key"].to_pylist()[:16]
    tokens = torch.from_numpy(to_matrix(table["text_tokens"], np.int32)[:16]).long()
    states, mask = CaptionEncoder(embed_dir, "cpu")(tokens)
    z_i = torch.from_numpy(to_matrix(table["image_emb"], np.float32)[:16])
    z_t = torch.from_numpy(to_matrix(table["text_emb"], np.float32)[:16])
    hi = torch.from_numpy(np.stack([images[k] for k in keys])).permute(0, 3, 1, 2).float() / 127.5 - 1
    lo = torch.nn.functional.interpolate(hi, size=32, mode="bilinear", antialias=True)

    prior_cfg = train_prior.model_config(train_prior.TrainPriorConfig(), embed_dir)
    prior = train_briefly("prior", prior_cfg, [{"image_emb": z_i, "text_emb": z_t, "text_states": states, "text_mask": mask}])
    decoder_cfg = train_decoder.model_config(train_decoder.TrainDecoderConfig(), embed_dir)
    decoder = train_briefly("decoder", decoder_cfg, [{"image": lo, "image_emb": z_i, "text_emb": z_t, "text_states": states,
                                                      "text_mask": mask}])
    up_cfg = dataclasses.asdict(sizes.config_for("upsampler", "tiny", image_size=64, low_res_size=32))
    upsampler = train_briefly("upsampler", up_cfg, [{"image": hi}])
    for name, model in (("train_prior", prior), ("train_decoder", decoder), ("train_upsampler", upsampler)):
        checkpoint.save(model, storage / name / "ema")
    return storage


def run_evaluate(storage: Path, **overrides):
    import mlflow

    from tasks import evaluate
    from tasks.context import StageContext

    cfg = evaluate.EvaluateConfig(**{
        "num_prompts": 4, "samples_per_prompt": 2, "real_images": 64, "val_fraction": 0.2, "prior": {"steps": 3},
        "decoder_steps": 3, "decoder_guidance": 2.0, "decoder_guidance_scales": [1.0, 2.0], "upsampler_steps": 2,
        "batch_size": 8, **overrides})
    out = storage / "evaluate"
    out.mkdir(exist_ok=True)
    inputs = {name: storage / name for name in ("ingest", "embed", "train_prior", "train_decoder", "train_upsampler")}
    use_sqlite_store(storage / "mlflow.db")
    with mlflow.start_run(run_name="evaluate") as run:
        values = evaluate.run(cfg, StageContext("evaluate", storage, out, inputs, seed=0, show_progress=False))
    return values, run.info.run_id


PER_SPLIT = ["fd_clip", "fd_clip_real_halves", "clip_score", "clip_score_real", "diversity", "precision", "recall",
             "aesthetic", "aesthetic_real",
             "prior_cos_image", "prior_cos_text", "text_cos_image", "prior_cos_unrelated",
             "one_object_colour_acc", "one_object_shape_acc", "one_object_acc", "one_object_colour_acc_base",
             "one_object_colour_acc_real", "one_object_prompts", "two_object_prompts"]
FIRST_SPLIT = ["fd_clip_text_emb", "fd_clip_below_text_emb_share", "clip_score_text_emb", "one_object_colour_acc_text_emb",
               "guidance_1/fd_clip", "guidance_2/fd_clip", "guidance_1/aesthetic", "guidance_2/diversity", "guidance_2/recall"]


def test_evaluate_writes_every_metric_grids_plots_and_report(stack_storage, monkeypatch):
    import mlflow

    from models.unclip import UnCLIP

    guidance = {"invert": set(), "variations": set()}  # the manipulations run on the driver, in this process
    for name in guidance:
        def spy(self, *args, _name=name, _method=getattr(UnCLIP, name), **kwargs):
            guidance[_name].add(kwargs["guidance_scale"])
            return _method(self, *args, **kwargs)
        monkeypatch.setattr(UnCLIP, name, spy)
    bars = ["heldout/one_object_colour_acc_real >= 0.9", "heldout/fd_clip_real_halves < heldout/fd_clip", "heldout/nothing > 0"]
    values, run_id = run_evaluate(stack_storage, bars=bars, manipulation_images=4, variation_images=6, variation_guidance=3.0,
                                  headline_prompts=6)
    assert guidance == {"invert": {2.0}, "variations": {3.0}}
    out = stack_storage / "evaluate"
    saved = json.loads((out / "metrics.json").read_text())
    expected = [f"{s}/{k}" for s in ("heldout", "validation") for k in PER_SPLIT] + [f"heldout/{k}" for k in FIRST_SPLIT]
    expected += [f"heldout/{k}" for k in ("inversion_psnr", "variation_consistency", "hf_share", "hf_share_bicubic", "hf_share_real", "hf_gap")]
    expected += ["images", "generate_s", "aesthetic_probe_r2"]
    assert not [k for k in expected if k not in saved], sorted(saved)
    assert any(k.startswith("heldout/two_object_acc") for k in saved) or saved["heldout/two_object_prompts"] == 0
    # heldout: 2 guidance scales + z_t; validation: 1; one image of 2 more captions for the stack and z_t at 2
    assert saved["images"] == 4 * 2 * 3 + 4 * 2 + 2 * 2 and saved["heldout/headline_prompts"] == 6
    assert saved["heldout/variation_sources"] == 6  # one variation of each of 6 one-object sources, not of the 4 inverted
    assert saved["heldout/variation_consistency"] * 6 == pytest.approx(round(saved["heldout/variation_consistency"] * 6))
    assert values["heldout/fd_clip"] == saved["heldout/fd_clip"]
    for key in ("one_object_colour_acc_real", "one_object_shape_acc_real"):  # the scorer reads real renders
        assert saved[f"heldout/{key}"] >= 0.9, key
    assert saved["heldout/text_cos_image"] == pytest.approx(saved["heldout/clip_score_real"], abs=0.05)

    for name in ("report.html", "fd_vs_guidance.png", "aesthetic_vs_diversity.png", "aesthetic_vs_recall.png", "aesthetic_probe.safetensors",
                 "grids/heldout_one_object.png", "grids/validation_one_object.png"):
        assert (out / name).is_file(), name
    assert [b["passed"] for b in json.loads((out / "bars.json").read_text())] == [True, True, False]
    for name in ("variations.png", "interpolation.png", "text_diff.png"):  # no pca stage here: no PCA probe
        assert (out / "manipulations" / name).is_file(), name
    assert Image.open(out / "manipulations" / "interpolation.png").width >= 8 * 64  # real | 6 frames | real
    assert Image.open(out / "manipulations" / "variations.png").width >= 5 * 64  # real | 4 variations
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 7 and "heldout/fd_clip" in html and "src=\"http" not in html
    assert "Quality bars" in html and "FAIL" in html and "heldout/nothing" in html
    assert "on heldout: one image for each of 6 captions" in html and "guidance sweep on 4 captions x 2 samples." in html
    assert ("Sections 3-4 (variations, interpolation, text diff, PCA probe) on heldout images: decoder guidance 2, "
            "inversion included; the eta = 1 variations decoded at 3.") in html
    client = mlflow.MlflowClient(f"sqlite:///{stack_storage}/mlflow.db")
    logged = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "grids")}
    assert {"metrics.json", "report.html", "fd_vs_guidance.png", "grids/heldout_one_object.png"} <= logged

    # the real images' CLIP features are computed as the embed stage computed the table's z_i
    from safetensors.torch import load_file

    cached = load_file(str(next((out / "real_stats").glob("heldout-*.safetensors"))))["clip"].numpy()
    table = heldout_table(stack_storage)
    assert cached.shape == table.shape
    assert (np.sum(cached * table, axis=1) > 0.99).all()


def heldout_table(storage: Path) -> np.ndarray:
    """z_i of the held-out rows by key, read with pyarrow alone."""
    import pyarrow.parquet as pq

    rows = [r for path in sorted((storage / "embed").glob("*.parquet")) for r in pq.read_table(str(path)).to_pylist()]
    rows = sorted((r for r in rows if r["split"] == "heldout"), key=lambda r: r["key"])
    return np.array([r["image_emb"] for r in rows], np.float32)


def test_real_statistics_are_cached_per_dataset_version(stack_storage):
    from tasks import evaluate
    from tasks.context import StageContext

    if not (stack_storage / "evaluate" / "metrics.json").is_file():
        run_evaluate(stack_storage)
    cfg = evaluate.EvaluateConfig(num_prompts=4, real_images=64, val_fraction=0.2, splits=["heldout"])
    inputs = {name: stack_storage / name for name in ("ingest", "embed")}
    ctx = StageContext("evaluate", stack_storage, stack_storage / "evaluate", inputs, seed=0, show_progress=False)
    data = evaluate.read_splits(cfg, ctx, 64)
    assert evaluate.real_features(cfg, ctx, list(data.values()), {}, None) == 1  # no pool needed: a hit
    assert np.allclose(data["heldout"].clip, heldout_table(stack_storage), atol=2e-3)
    hit, _ = evaluate.real_stats_path(cfg, ctx, data["heldout"], None)
    assert hit.is_file()
    fewer = cfg.model_copy(update={"real_images": 8})
    other_rows, _ = evaluate.real_stats_path(fewer, ctx, evaluate.read_splits(fewer, ctx, 64)["heldout"], None)
    (stack_storage / "embed" / "_manifest.json").write_text('{"fingerprint": "another dataset version"}')
    try:
        other_version, _ = evaluate.real_stats_path(cfg, ctx, data["heldout"], None)
    finally:
        (stack_storage / "embed" / "_manifest.json").unlink()
    assert len({hit, other_rows, other_version}) == 3


def test_real_halves_are_far_closer_than_noise(stack_storage):
    from tasks.evaluate import _clip_features
    from tasks.schema import load_embedding_clip

    real = heldout_table(stack_storage)
    clip = load_embedding_clip(stack_storage / "embed")
    noise = _clip_features(clip, np.random.default_rng(0).integers(0, 256, (len(real), 64, 64, 3), dtype=np.uint8))
    half = len(real) // 2
    assert metrics.frechet_distance(real[:half], real[half:]) < 0.25 * metrics.frechet_distance(real, noise)


def test_text_to_image_decodes_at_the_configured_eta(stack_storage):
    """decoder_eta reaches the decoder: the same seeded job draws the same images at eta 0 and other
    images at eta 1 (ancestral steps add fresh noise)."""
    from tasks import evaluate

    def draw(eta: float) -> np.ndarray:
        settings = {"prior": {"steps": 2}, "decoder_steps": 3, "decoder_eta": eta, "upsampler_steps": 2, "use_caption": True}
        actor = evaluate.StackActor(str(stack_storage), "ema", settings, None, device="cpu", threads=1)
        batch = {"job": np.arange(2), "mode": np.array(["stack"] * 2, dtype=object), "guidance": np.array([2.0, 2.0]),
                 "caption": np.array(["a red circle", "a blue square"], dtype=object), "seed": np.array([7, 8])}
        return actor(batch)["image"]

    deterministic = draw(0.0)
    assert np.array_equal(deterministic, draw(0.0))
    assert not np.array_equal(deterministic, draw(1.0))


def test_fid_with_local_inception_weights(stack_storage, inception_file):
    values, _ = run_evaluate(stack_storage, splits=["heldout"], num_prompts=2, real_images=8, decoder_guidance_scales=[2.0],
                             inception_weights=str(inception_file))
    for key in ("heldout/fid", "heldout/fid_text_emb", "heldout/guidance_2/fid"):
        assert values[key] > 0, key
    cached = sorted((stack_storage / "evaluate" / "real_stats").glob("heldout-*.json"))
    assert any(json.loads(p.read_text())["inception"] for p in cached)  # its own cache entry


def test_ratings_table_images_are_read_from_local_paths(stack_storage, tmp_path):
    """An AVA-style table (`image` path, `score`): the FeatureActor embeds the files as the embed
    stage embeds images; URLs and missing columns are refused with the fix."""
    from PIL import Image

    from tasks import evaluate
    from tasks.context import StageContext
    from tasks.schema import load_embedding_clip

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8) for i in range(3)]  # not square: cropped
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    actor = evaluate.FeatureActor(str(stack_storage / "embed"), None, device="cpu", threads=1)
    out = actor({"row": np.arange(3), "path": np.array([str(tmp_path / f"{i}.png") for i in range(3)], dtype=object)})
    clip = load_embedding_clip(stack_storage / "embed")
    expected = np.concatenate([evaluate._clip_features(clip, [Image.fromarray(im)]) for im in images])
    assert np.allclose(out["clip"], expected, atol=1e-5)

    ctx = StageContext("evaluate", stack_storage, tmp_path, {"embed": stack_storage / "embed"}, seed=0, show_progress=False)
    (tmp_path / "urls.csv").write_text("image,score\nhttp://example.com/a.jpg,5.5\n")
    with pytest.raises(ValueError, match="URLs are not fetched"):
        evaluate._rated_table(evaluate.EvaluateConfig(aesthetic_ratings=str(tmp_path / "urls.csv")), ctx, {})
    (tmp_path / "bad.csv").write_text("path,rating\n0.png,5.5\n")
    with pytest.raises(ValueError, match=r"columns \['image', 'score'\] are missing"):
        evaluate._rated_table(evaluate.EvaluateConfig(aesthetic_ratings=str(tmp_path / "bad.csv")), ctx, {})
