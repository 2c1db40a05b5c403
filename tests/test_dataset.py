"""tasks.dataset: the training read path over the embedding table (shares the session's embedded table)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tasks.dataset import embedding_dataset, validation_mask
from tasks.schema import read_embeddings, to_matrix
from tests.shards import embedded  # noqa: F401


def _rows(ds) -> dict:
    out = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, key in enumerate(batch["key"]):
            out[key] = {k: v[i] for k, v in batch.items()}
    return out


def test_splits_partition_the_table_stably(embedded):
    table = read_embeddings(embedded.out)
    keys, splits = table["key"].to_pylist(), table["split"].to_pylist()
    train = _rows(embedding_dataset(embedded.out, "train", val_fraction=0.3))
    val = _rows(embedding_dataset(embedded.out, "validation", val_fraction=0.3))
    held = _rows(embedding_dataset(embedded.out, "heldout", val_fraction=0.3))
    assert not (set(train) & set(val)) and not (set(train) & set(held)) and not (set(val) & set(held))
    assert set(train) | set(val) | set(held) == set(keys)
    assert set(held) == {k for k, s in zip(keys, splits) if s == "heldout"}
    not_held = [k for k, s in zip(keys, splits) if s != "heldout"]
    assert 0.15 < len(val) / len(not_held) < 0.45
    # membership depends on the key alone: the same answer one key at a time, and again on a new read
    assert set(val) == {k for k in not_held if validation_mask([k], 0.3)[0]}
    assert set(_rows(embedding_dataset(embedded.out, "validation", val_fraction=0.3))) == set(val)
    # another salt gives another split
    assert set(_rows(embedding_dataset(embedded.out, "validation", val_fraction=0.3, salt="x"))) != set(val)


def test_batches_are_numpy_matrices_equal_to_the_table(embedded):
    table = read_embeddings(embedded.out)
    ds = embedding_dataset(embedded.out, "all", columns=["key", "image_emb", "text_tokens"])
    batch = next(iter(ds.iter_batches(batch_size=8, batch_format="numpy")))
    assert set(batch) == {"key", "image_emb", "text_tokens"}
    assert batch["image_emb"].shape == (8, 64) and batch["image_emb"].dtype == np.float32
    assert batch["text_tokens"].shape == (8, 32) and batch["text_tokens"].dtype == np.int32
    index = {k: i for i, k in enumerate(table["key"].to_pylist())}
    expected = to_matrix(table["image_emb"])[[index[k] for k in batch["key"]]]
    np.testing.assert_array_equal(batch["image_emb"], expected)
    torch_batch = next(iter(embedding_dataset(embedded.out, "train", columns=["image_emb", "similarity"])
                            .iter_torch_batches(batch_size=4)))
    assert tuple(torch_batch["image_emb"].shape) == (4, 64)


def test_join_with_images_from_the_shards(embedded):
    rows = _rows(embedding_dataset(embedded.out, "all", ingest_dir=embedded.ingest))
    assert set(rows) == set(read_embeddings(embedded.out)["key"].to_pylist())
    for key in [k for k in rows if k in embedded.good][:10]:  # (test_embed may have added shards)
        original = np.asarray(Image.open(io.BytesIO(embedded.good[key][2])).convert("RGB"))
        np.testing.assert_array_equal(rows[key]["image"], original)
        assert rows[key]["caption"] == embedded.good[key][0]
    small = next(iter(embedding_dataset(embedded.out, "train", ingest_dir=embedded.ingest, image_size=32)
                      .iter_batches(batch_size=4, batch_format="numpy")))
    assert small["image"].shape == (4, 32, 32, 3) and small["image"].dtype == np.uint8


def test_bad_arguments(embedded, tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        embedding_dataset(embedded.out, "test")
    with pytest.raises(ValueError, match="val_fraction"):
        embedding_dataset(embedded.out, "train", val_fraction=1.5)
    with pytest.raises(FileNotFoundError, match="run the embed stage"):
        embedding_dataset(tmp_path / "nothing", "train")
