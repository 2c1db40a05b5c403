"""What the evaluate stage measures, as plain functions of features (no Ray, no MLflow).

- Fréchet distance: torchmetrics' `FrechetInceptionDistance` fed with features computed elsewhere
  (CLIP image embeddings: `fd_clip`; the FID Inception network: `fid`). Real-image statistics are
  kept as `FeatureStats` (the metric's own running sums), so they can be cached per dataset version.
- FID's Inception network from a local safetensors file only (`inception_network`): nothing downloads.
- CLIP score (mean cosine between a generated image's CLIP embedding and its caption's z_t),
  diversity (mean pairwise CLIP cosine distance between samples of one prompt), and k-NN
  precision/recall of generated vs real features (torch-fidelity's, Kynkäänniemi et al. 2019).
- On the synthetic shapes, the scorer's colour/shape accuracy for scenes of known content (`scene_accuracy`).
- The CLIP-probe aesthetic score: a ridge regression on CLIP image embeddings of a ratings table
  (`fit_probe`, `LinearProbe`), as the paper's AVA probe; `stand_in_rating` rates the synthetic shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

INCEPTION_HOWTO = (
    "FID needs the FID Inception weights as a local safetensors file: on a machine with internet, download "
    "torch-fidelity's weights-inception-2015-12-05-6726825d.pth (github.com/toshas/torch-fidelity/releases, "
    "v0.2.0) and convert it once with `python -c \"import torch, safetensors.torch as s; "
    "s.save_file(torch.load('weights-inception-2015-12-05-6726825d.pth'), 'inception.safetensors')\"`; "
    "then set evaluate.inception_weights to that file (a relative path is under storage), or set it to null "
    "to report only fd_clip")


class InceptionWeightsError(FileNotFoundError):
    """The configured FID Inception weights are missing or do not fit the network."""


# ---------------------------------------------------------------------------------------------
# Fréchet distance


class GivenFeatures(torch.nn.Module):
    """The `feature` module torchmetrics' FID calls on its inputs: here the inputs already are the
    features (computed by the evaluation actors), so it passes them through."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@dataclass
class FeatureStats:
    """Running sums of a feature set: what torchmetrics' FID keeps for the real images."""

    total: torch.Tensor  # (D,) float64, sum of features
    outer: torch.Tensor  # (D, D) float64, sum of outer products
    count: int

    @classmethod
    def of(cls, features: np.ndarray | torch.Tensor) -> "FeatureStats":
        f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        return cls(f.sum(0), f.T @ f, f.shape[0])

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """For a safetensors file (the real-image statistics cache)."""
        return {f"{prefix}total": self.total, f"{prefix}outer": self.outer,
                f"{prefix}count": torch.tensor([self.count], dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> "FeatureStats":
        return cls(tensors[f"{prefix}total"].double(), tensors[f"{prefix}outer"].double(), int(tensors[f"{prefix}count"][0]))


def frechet_distance(real: FeatureStats | np.ndarray, fake: np.ndarray | torch.Tensor) -> float:
    """||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)) between two feature sets, by
    torchmetrics (float64). `real` may be cached statistics."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    real = real if isinstance(real, FeatureStats) else FeatureStats.of(real)
    if real.count < 2 or fake.shape[0] < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 features on each side (got {real.count} real, {fake.shape[0]} generated)")
    metric = FrechetInceptionDistance(feature=GivenFeatures(fake.shape[1]), reset_real_features=False)
    metric.real_features_sum = real.total.clone()
    metric.real_features_cov_sum = real.outer.clone()
    metric.real_features_num_samples = torch.tensor(real.count)
    metric.update(fake, real=False)
    return float(metric.compute())


def fd_order_share(real: np.ndarray, a: np.ndarray, b: np.ndarray, resamples: int = 200, seed: int = 0) -> float:
    """The share of paired bootstrap resamples in which `a` is closer to `real` than `b` by Fréchet
    distance. Rows of a and b pair up (images drawn for the same captions) and are resampled
    together: near 1 or 0 the ordering would hold on other captions of the kind, near 0.5 it is noise."""
    if len(a) != len(b):
        raise ValueError(f"paired feature sets differ in length: {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    stats = FeatureStats.of(real)
    wins = 0
    for _ in range(resamples):
        rows = rng.integers(0, len(a), len(a))
        wins += frechet_distance(stats, a[rows]) < frechet_distance(stats, b[rows])
    return wins / resamples


def inception_network(weights: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """torchmetrics' FID Inception-v3 (torch-fidelity's port of the TF FID graph): uint8 images
    (B, 3, H, W) -> (B, 2048) pool features, with weights from a local safetensors file.

    torch-fidelity's constructor loads its weights either by downloading them or with
    `torch.load` (a pickle); neither is allowed here, so its download function is replaced, for
    the duration of the constructor, by a reader of the safetensors file."""
    from unittest import mock

    from safetensors.torch import load_file
    from torch_fidelity import feature_extractor_inceptionv3 as inception_module
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = Path(weights)
    if not path.is_file():
        raise InceptionWeightsError(f"evaluate.inception_weights: {path} does not exist. {INCEPTION_HOWTO}")
    if path.suffix != ".safetensors":
        raise InceptionWeightsError(f"evaluate.inception_weights: {path} is not a .safetensors file (pickles are never loaded). {INCEPTION_HOWTO}")
    state = load_file(str(path))
    try:
        with mock.patch.object(inception_module, "load_state_dict_from_url", lambda *args, **kwargs: state):
            network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    except RuntimeError as e:  # load_state_dict: missing/unexpected keys or shapes
        raise InceptionWeightsError(f"evaluate.inception_weights: {path} does not hold FID Inception-v3 weights "
                                    f"({str(e).splitlines()[0]}). {INCEPTION_HOWTO}") from None
    network.num_features = 2048
    return network.to(device)


# ---------------------------------------------------------------------------------------------
# CLIP score and diversity


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of cos(a_i, b_i)."""
    return float((_unit(a) * _unit(b)).sum(-1).mean())


def diversity(features: np.ndarray, groups: np.ndarray) -> float:
    """Mean pairwise cosine distance (1 - cos) between the features of one group (the samples of
    one prompt), averaged over groups with at least two members; NaN if there are none."""
    features, groups = _unit(features), np.asarray(groups)
    values = []
    for g in np.unique(groups):
        f = features[groups == g]
        if len(f) < 2:
            continue
        cos = f @ f.T
        upper = np.triu_indices(len(f), k=1)
        values.append(float((1.0 - cos[upper]).mean()))
    return float(np.mean(values)) if values else float("nan")


PRC_NEIGHBOURS = 3  # the paper's (Kynkäänniemi et al. 2019) and torch-fidelity's default k


def precision_recall(generated: np.ndarray, real: np.ndarray, k: int = PRC_NEIGHBOURS) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) by torch-fidelity's k-NN estimate:
    precision is the fraction of generated features inside some real feature's ball (radius: the
    distance to its k-th nearest real neighbour), recall the fraction of real features inside some
    generated feature's ball. Euclidean distance on the features as given; each set needs more
    than k rows."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    generated, real = (torch.as_tensor(np.asarray(x, dtype=np.float64)) for x in (generated, real))
    if generated.ndim != 2 or real.ndim != 2 or generated.shape[1] != real.shape[1]:
        raise ValueError(f"precision_recall: features must be [n, d] with the same d, got {tuple(generated.shape)} and {tuple(real.shape)}")
    if min(len(generated), len(real)) <= k:
        raise ValueError(f"precision_recall: k={k} needs more than {k} generated and real rows, got {len(generated)} and {len(real)}")
    out = prc_features_to_metric(generated, real, prc_neighborhood=k, save_cpu_ram=False, verbose=False)
    return {"precision": float(out["precision"]), "recall": float(out["recall"])}


# ---------------------------------------------------------------------------------------------
# The synthetic shapes: scorer accuracy


def _at_least(images: np.ndarray, size: int) -> list:
    """PIL images resized (bicubic) up to `size` when smaller."""
    from PIL import Image

    out = []
    for im in images:
        pil = Image.fromarray(np.asarray(im, np.uint8))
        out.append(pil.resize((size, size), Image.Resampling.BICUBIC) if pil.size[0] < size else pil)
    return out


def high_frequency_share(images: np.ndarray, cutoff: float) -> float:
    """Mean share of an image's spectral power (grey level, mean removed) above `cutoff` cycles
    per pixel (Nyquist is 0.5). With cutoff = the Nyquist of a smaller base image, it measures
    the detail an upsampler adds: bicubic upsampling adds almost none, sharp real edges have some."""
    grey = np.asarray(images, np.float64).mean(-1)
    grey -= grey.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(grey)) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(grey.shape[1]), np.fft.fftfreq(grey.shape[2]), indexing="ij")
    high = np.hypot(fx, fy) > cutoff
    return float((power[:, high].sum(1) / np.maximum(power.reshape(len(grey), -1).sum(1), 1e-12)).mean())


def bicubic_to(images: np.ndarray, size: int) -> np.ndarray:
    """(N, s, s, 3) uint8 -> (N, size, size, 3) uint8 by PIL's bicubic."""
    return np.stack([np.asarray(im) for im in _at_least(images, size)])


def scene_accuracy(images: np.ndarray, objects: list[str], size: int) -> dict[str, float]:
    """The scorer on images of known scenes. One object: its colour and shape against the
    largest detection; two objects: exactly the two colour-shape pairs (tasks.shapes.score_matches)."""
    from tasks.shapes import score_image, score_matches

    one, two = [], []
    for image, scene in zip(_at_least(images, size), objects):
        expected = json.loads(scene)
        if len(expected) == 1:
            found = score_image(image)
            top = found[0] if found else None
            one.append((top is not None and top.colour == expected[0]["colour"],
                        top is not None and top.shape == expected[0]["shape"]))
        elif len(expected) == 2:
            two.append(score_matches(image, scene))
    out = {}
    if one:
        colour, shape = np.array(one).T
        out.update(one_object_colour_acc=float(colour.mean()), one_object_shape_acc=float(shape.mean()),
                   one_object_acc=float((colour & shape).mean()))
    if two:
        out["two_object_acc"] = float(np.mean(two))
    return out


# ---------------------------------------------------------------------------------------------
# CLIP-probe aesthetic score


def stand_in_rating(objects_json: str, size: int = 64) -> float:
    """The demo's stand-in for a human aesthetic rating: 10 x the fraction of the image the
    scene's shapes cover (rendered exactly).

    There are no human ratings of the synthetic shapes; this rating stands in so that the
    probe's machinery (ridge on CLIP image embeddings of a rated table, then the mean prediction
    on generated images) runs end to end on data where the truth is known. Coverage is a property
    of the picture CLIP can see (the captions' "small"/"large" say it too) and it varies across
    images, so a working probe has something to recover; the number is not a judgement of beauty."""
    from tasks.shapes import BACKGROUND, ShapeObject, render

    objects = [ShapeObject(**o) for o in json.loads(objects_json)]
    pixels = np.asarray(render(objects, size), dtype=np.int16)
    covered = (np.abs(pixels - np.array(BACKGROUND, np.int16)).sum(-1) > 30).mean()
    return float(10.0 * covered)


@dataclass
class LinearProbe:
    """rating ≈ features · weight + bias, on unit-norm CLIP image embeddings."""

    weight: np.ndarray  # (D,)
    bias: float
    r2: float = float("nan")  # on the ratings kept out of the fit
    source: str = ""

    def predict(self, features: np.ndarray) -> np.ndarray:
        return _unit(features) @ self.weight + self.bias

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(path)
        save_file({"weight": self.weight.astype(np.float32), "bias": np.array([self.bias], np.float32)}, str(path))
        path.with_suffix(".json").write_text(json.dumps({"r2": self.r2, "source": self.source, "dim": len(self.weight)}, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LinearProbe":
        from safetensors.numpy import load_file

        path = Path(path)
        tensors = load_file(str(path))
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        return cls(tensors["weight"].astype(np.float64), float(tensors["bias"][0]), float(meta.get("r2", "nan")),
                   meta.get("source", str(path)))


def fit_probe(features: np.ndarray, ratings: np.ndarray, alpha: float = 1.0, test_fraction: float = 0.2,
              seed: int = 0, source: str = "") -> LinearProbe:
    """Ridge regression of ratings on (unit-norm) features; R² measured on `test_fraction` of the
    rows kept out of the fit."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score

    x, y = _unit(features), np.asarray(ratings, dtype=np.float64)
    if len(y) < 5:
        raise ValueError(f"the aesthetic probe needs at least 5 rated images, got {len(y)}")
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = max(1, int(round(test_fraction * len(y)))) if test_fraction > 0 else 0
    test, train = order[:n_test], order[n_test:]
    ridge = Ridge(alpha=alpha).fit(x[train], y[train])
    r2 = float(r2_score(y[test], ridge.predict(x[test]))) if n_test >= 2 else float("nan")
    return LinearProbe(ridge.coef_.astype(np.float64), float(ridge.intercept_), r2, source)
