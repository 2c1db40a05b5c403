"""tasks.embed on real Ray, real tar shards and Parquet (the embedding is run once per session)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from models.clip import TINY_CLIP_ARCH
from tests.shards import CORRUPT, PER_SHARD, TRUNCATED_SHARD, embedded, independent_embeddings, write_shard, write_shards  # noqa: F401
from tasks.context import StageContext
from tasks.embed import EmbedConfig, plan_resources, run
from tasks.schema import embed_metadata, list_embedding_files, load_embedding_clip, read_embeddings, to_matrix


def _table(e):
    return read_embeddings(e.out)


def test_counts_rows_and_filter(embedded):
    c = embedded.counts
    table = _table(embedded)
    good = embedded.good
    assert c["shards_embedded"] == 6 and c["shards_skipped_existing"] == 0
    assert c["skipped_corrupt_image"] == 1 and c["skipped_corrupt_caption"] == 1 and c["skipped_incomplete"] == 1
    assert c["skipped_corrupt"] == 3 and c["shards_truncated"] == 1
    assert c["rows_read"] == len(good) + 3
    assert 0 < c["filtered_similarity"] < len(good)
    assert c["rows"] == table.num_rows == len(good) - c["filtered_similarity"]
    # the filter dropped exactly the pairs an independent open_clip computation puts below the threshold
    z_i, z_t = independent_embeddings(embedded.reference_weights, TINY_CLIP_ARCH, [(v[0], v[2]) for v in good.values()])
    sims = dict(zip(good, (z_i * z_t).sum(-1)))
    assert set(table["key"].to_pylist()) == {k for k, s in sims.items() if s >= embedded.threshold}


def test_one_file_per_shard_unique_keys_and_damage_handling(embedded):
    files = list_embedding_files(embedded.out)
    assert [f.stem for f in files] == [f"{i:05d}" for i in range(6)]
    assert not (embedded.out / ".parts").exists()  # the workers' part files were merged and removed
    table = _table(embedded)
    keys = table["key"].to_pylist()
    assert len(keys) == len(set(keys))
    for f in files:
        shard = pq.read_table(f)
        assert set(shard["shard"].to_pylist()) <= {f.stem}
    # corrupt samples of shard 4 are absent; the readable head of the truncated shard is there
    assert not {f"00004{i:04d}" for i in CORRUPT} & set(keys)
    truncated_keys = [k for k in embedded.good if k.startswith(f"{TRUNCATED_SHARD:05d}")]
    assert 5 <= len(truncated_keys) < PER_SHARD
    assert {k for k in keys if k.startswith("00005")} <= set(truncated_keys)


def test_schema_is_plain_arrow_with_metadata(embedded):
    schema = pq.read_schema(list_embedding_files(embedded.out)[0])
    assert str(schema.field("image_emb").type) == "fixed_size_list<element: halffloat>[64]"
    assert str(schema.field("text_tokens").type) == "fixed_size_list<element: int32>[32]"
    meta = embed_metadata(schema)
    assert meta["embed_dim"] == 64 and meta["context_length"] == 32 and len(meta["fingerprint"]) == 16


def test_unit_norm_similarity_tokens_split(embedded):
    table = _table(embedded)
    z_i, z_t = to_matrix(table["image_emb"]), to_matrix(table["text_emb"])
    np.testing.assert_allclose(np.linalg.norm(z_i, axis=1), 1.0, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(z_t, axis=1), 1.0, atol=2e-3)
    np.testing.assert_allclose(table["similarity"].to_numpy(), (z_i * z_t).sum(1), atol=3e-3)
    assert (table["similarity"].to_numpy() >= embedded.threshold).all()
    tokenizer = open_clip.SimpleTokenizer(context_length=32)
    tokens = to_matrix(table["text_tokens"], np.int64)
    for row, caption in zip(tokens, table["caption"].to_pylist()):
        ids = [int(t) for t in row if t not in (0, tokenizer.sot_token_id)]
        ids = ids[: ids.index(tokenizer.eot_token_id)]
        assert tokenizer.decode(ids).strip() == caption
    splits = dict(zip(table["key"].to_pylist(), table["split"].to_pylist()))
    assert {s for s in splits.values()} == {"train", "heldout"}
    assert all(splits[k] == embedded.good[k][1] for k in splits)


def test_embeddings_match_open_clip_directly(embedded):
    """20 rows recomputed with open_clip alone (no Ray, no tasks code), compared at float16."""
    table = _table(embedded)
    saved = load_file(str(embedded.out / "clip" / "clip.safetensors"))
    for name, value in embedded.reference_weights.items():  # the stage's seeded init = ours
        torch.testing.assert_close(saved[name], value)
    keys = table["key"].to_pylist()
    pick = np.random.default_rng(0).choice(len(keys), 20, replace=False)
    samples = [(embedded.good[keys[i]][0], embedded.good[keys[i]][2]) for i in pick]
    z_i, z_t = independent_embeddings(embedded.reference_weights, TINY_CLIP_ARCH, samples)
    got_i, got_t = to_matrix(table["image_emb"])[pick], to_matrix(table["text_emb"])[pick]
    cos_i = (z_i * got_i).sum(1) / np.linalg.norm(got_i, axis=1)
    cos_t = (z_t * got_t).sum(1) / np.linalg.norm(got_t, axis=1)
    assert cos_i.min() >= 0.999 and cos_t.min() >= 0.999
    # and the table's own CLIP loader gives back the same encoder
    clip = load_embedding_clip(embedded.out)
    torch.testing.assert_close(clip.encode_text(clip.tokenize([samples[0][0]]))[0], torch.as_tensor(z_t[0]), atol=1e-5, rtol=0)


DRIVER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import ray
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, _temp_dir=sys.argv[3],
             log_to_driver=False)
    import time
    import tasks.embed
    from tasks.context import StageContext
    from tasks.embed import EmbedConfig, run

    class SlowEncoder(tasks.embed.ClipEncodeActor):  # defined here, so Ray ships it by value
        def __call__(self, batch):  # spreads the shards' completions out, so that the kill lands mid-run
            time.sleep(0.05)
            return super().__call__(batch)

    tasks.embed.ClipEncodeActor = SlowEncoder
    cfg = EmbedConfig(clip_arch="tiny", clip_pretrained=None, batch_size=2, min_similarity=float(sys.argv[4]))
    run(cfg, StageContext("embed", Path(sys.argv[1]).parent, Path(sys.argv[2]), {"ingest": Path(sys.argv[1])},
                          seed=0, show_progress=False))
""")


def test_killed_run_resumes_to_the_same_table(embedded, tmp_path):
    ingest = tmp_path / "ingest"
    shutil.copytree(embedded.ingest, ingest)
    out = tmp_path / "embed"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(ingest), str(out), ray_tmp,
                             repr(embedded.threshold)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "driver.log", "wb"))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not list(out.glob("*.parquet")):
            time.sleep(0.02)
        assert proc.poll() is None, "the driver ended before it could be killed: " + (tmp_path / "driver.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray instance it started
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    written_before = len(list(out.glob("*.parquet")))
    assert 1 <= written_before < 6
    assert len(list_embedding_files(out)) == written_before  # a killed run's parts never look like a shard
    cfg = EmbedConfig(clip_arch="tiny", clip_pretrained=None, batch_size=16, min_similarity=embedded.threshold)
    counts = run(cfg, StageContext("embed", tmp_path, out, {"ingest": ingest}, seed=0, show_progress=False))
    assert counts["shards_skipped_existing"] == written_before
    assert counts["shards_embedded"] == 6 - written_before
    assert not list(out.glob(".*.tmp")) and not (out / ".parts").exists()
    resumed, reference = read_embeddings(out).sort_by("key"), _table(embedded).sort_by("key")
    keys = resumed["key"].to_pylist()
    assert keys == reference["key"].to_pylist() and len(keys) == len(set(keys))
    np.testing.assert_allclose(to_matrix(resumed["image_emb"]), to_matrix(reference["image_emb"]), atol=2e-3)


def test_rerun_embeds_only_new_shards(embedded):
    out = embedded.out
    cfg = EmbedConfig(clip_arch="tiny", clip_pretrained=None, batch_size=16, min_similarity=embedded.threshold)
    ctx = StageContext("embed", out.parent, out, {"ingest": embedded.ingest}, seed=0, show_progress=False)
    before = {f.name: f.stat().st_mtime_ns for f in list_embedding_files(out)}
    counts = run(cfg, ctx)
    assert counts["shards_embedded"] == 0 and counts["shards_skipped_existing"] == 6 and counts["rows"] == 0
    write_shards(embedded.ingest, [6, 7], PER_SHARD)
    counts = run(cfg, ctx)
    assert counts["shards_embedded"] == 2 and counts["shards_skipped_existing"] == 6
    after = {f.name: f.stat().st_mtime_ns for f in list_embedding_files(out)}
    assert {k: after[k] for k in before} == before and set(after) - set(before) == {"00006.parquet", "00007.parquet"}
    keys = read_embeddings(out)["key"].to_pylist()
    assert len(keys) == len(set(keys))
    # a rewritten tar (ingest redone) is embedded again; a vanished tar takes its rows with it
    write_shard(embedded.ingest, 0, PER_SHARD - 5)
    (embedded.ingest / "00007.tar").unlink()
    counts = run(cfg, ctx)
    assert counts["shards_reembedded_stale"] == 1 and counts["shards_embedded"] == 1
    assert counts["files_removed_orphan"] == 1 and counts["rows_read"] == PER_SHARD - 5
    assert [f.stem for f in list_embedding_files(out)] == [f"{i:05d}" for i in range(7)]
    assert pq.read_table(out / "00000.parquet").num_rows == counts["rows"]
    # a changed config (another filter) makes the old files stale: they are embedded again
    counts = run(cfg.model_copy(update={"min_similarity": None}), ctx)
    assert counts["shards_reembedded_stale"] == 7 and counts["filtered_similarity"] == 0


def test_plan_resources_on_small_and_gpu_clusters():
    plan = plan_resources(EmbedConfig(), {"CPU": 2.0}, 4)
    assert plan["actor_pool_size"] == 1 and plan["cpus_per_actor"] == 0.75 and plan["torch_threads"] == 2
    assert plan["writer_pool_size"] == 1 and plan["cpus_per_writer"] == 0.25
    plan = plan_resources(EmbedConfig(num_gpus_per_actor=1), {"CPU": 16.0, "GPU": 4.0}, 100)
    assert plan["actor_pool_size"] == 4 and plan["gpus_per_actor"] == 1
    with pytest.raises(ValueError, match="num_gpus_per_actor"):
        plan_resources(EmbedConfig(num_gpus_per_actor=1), {"CPU": 2.0}, 4)
    with pytest.raises(ValueError, match="actor_pool_size"):
        plan_resources(EmbedConfig(actor_pool_size=2, cpus_per_actor=1.0), {"CPU": 2.0}, 4)


def test_config_errors_name_the_key():
    with pytest.raises(ValidationError, match="batch_size"):
        EmbedConfig(batch_size=0)
    with pytest.raises(ValidationError, match="min_similarity"):
        EmbedConfig(min_similarity=1.5)
    with pytest.raises(ValidationError, match="emb_dtype"):
        EmbedConfig(emb_dtype="int8")
    with pytest.raises(ValidationError, match="batchsize"):
        EmbedConfig(batchsize=3)


def test_unreadable_tar_and_empty_shard_table(tmp_path):
    from tasks.embed import _shard_table
    from tasks.schema import embedding_schema, iter_tar_samples

    bad = tmp_path / "00009.tar"
    bad.write_bytes(b"this is not a tar archive" * 50)
    items = list(iter_tar_samples(str(bad)))
    assert len(items) == 1 and isinstance(items[0], Exception)
    table, counts = _shard_table([], embedding_schema(64, 32))
    assert table.num_rows == 0 and sum(counts.values()) == 0 and table.schema.names[0] == "key"


def test_part_writer_groups_by_shard_and_merge_writes_one_sorted_file(tmp_path):
    """The worker side without Ray: one batch holding two shards and a marker → one part per shard
    and counts only; merging parts → the shard's file, rows in key order, parts gone."""
    from tasks.embed import MARKER, ShardPartWriter, merge_shard_parts
    from tasks.schema import embedding_schema

    schema = embedding_schema(4, 8)
    rng = np.random.default_rng(0)

    def batch(keys, shards, statuses, counts=None):
        n = len(keys)
        return {"key": np.array(keys, object), "caption": np.array([f"c{k}" for k in keys], object),
                "shard": np.array(shards, object), "split": np.array(["train"] * n, object),
                "status": np.array(statuses, object), "count": np.array(counts or [0] * n, np.int64),
                "image_emb": rng.normal(size=(n, 4)).astype(np.float16), "text_emb": rng.normal(size=(n, 4)).astype(np.float16),
                "text_tokens": np.ones((n, 8), np.int32), "similarity": np.zeros(n, np.float32)}

    writer = ShardPartWriter(str(tmp_path / ".parts"), schema)
    first = writer(batch(["b3", "a1", "x1", "b2"], ["00000", "00000", "00001", "00000"],
                         ["ok", "ok", "filtered_similarity", "corrupt_image"]))
    assert sorted(first) == sorted(["shard", "part", "truncated", "rows", "expected", "ok", "corrupt_image",
                                    "corrupt_caption", "incomplete", "filtered"])  # no embeddings go on
    by_shard = {s: i for i, s in enumerate(first["shard"])}
    assert first["rows"][by_shard["00000"]] == 3 and first["ok"][by_shard["00000"]] == 2
    assert first["corrupt_image"][by_shard["00000"]] == 1 and first["part"][by_shard["00001"]] == ""  # nothing kept
    second = writer(batch(["a0", ""], ["00000", "00000"], ["ok", MARKER], counts=[0, 4]))
    assert list(second["expected"]) == [-1, 4] and list(second["rows"]) == [1, 0]
    parts = [first["part"][by_shard["00000"]], second["part"][0]]
    target = tmp_path / "00000.parquet"
    assert merge_shard_parts(parts, schema, str(target), str(tmp_path / ".parts" / "00000")) == 3
    assert pq.read_table(target)["key"].to_pylist() == ["a0", "a1", "b3"]
    assert not (tmp_path / ".parts" / "00000").exists() and list_embedding_files(tmp_path) == [target]


def test_a_moved_storage_loads_the_clip_trained_in_it(tmp_path):
    """With clip_from: train_clip the embed stage's CLIP is train_clip's weights file: a storage
    copied or renamed as a whole (off a cluster, say) still loads it, and bundles it into a model."""
    from models.clip import load_clip, save_clip_weights
    from tasks.embed import resolve_clip_spec
    from tasks.schema import CLIP_DIR, CLIP_SPEC_NAME, CLIP_WEIGHTS_NAME, export_clip_dir, load_clip_dir

    storage = tmp_path / "run"
    trained = storage / "train_clip" / "clip"  # what tasks.train_clip exports
    trained.mkdir(parents=True)
    torch.manual_seed(1)
    save_clip_weights(load_clip(None, None, arch=TINY_CLIP_ARCH), trained / "clip.safetensors")
    (trained / "arch.json").write_text(json.dumps(TINY_CLIP_ARCH))
    cfg = EmbedConfig(clip_model=None, clip_arch=str(trained / "arch.json"), clip_pretrained=str(trained / "clip.safetensors"))
    spec = resolve_clip_spec(cfg, storage / "embed", storage, seed=0)  # as tasks.embed.run with clip_from: train_clip
    (storage / "embed" / CLIP_DIR).mkdir(parents=True)
    (storage / "embed" / CLIP_DIR / CLIP_SPEC_NAME).write_text(json.dumps(spec))
    clip = load_clip_dir(storage / "embed" / CLIP_DIR)
    tokens = clip.tokenize(["a small red circle", "a large blue star"])
    with torch.no_grad():
        expected = clip.encode_text(tokens)

    storage.rename(tmp_path / "moved")
    moved = tmp_path / "moved" / "embed" / CLIP_DIR
    with torch.no_grad():
        torch.testing.assert_close(load_clip_dir(moved).encode_text(tokens), expected)
    bundle = export_clip_dir(moved, tmp_path / "bundle")
    assert (bundle / CLIP_WEIGHTS_NAME).read_bytes() == (tmp_path / "moved" / "train_clip" / "clip" / "clip.safetensors").read_bytes()
