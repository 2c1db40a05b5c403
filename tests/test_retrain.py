"""`unclip retrain` end to end on the quick preset (tiny step counts): new URL lists are added to a
finished run; only their shards are downloaded and embedded; every model continues from the
champion's weights and step count; a new version is registered; `champion` moves only by the rule;
the same list twice trains nothing. (A version that does not beat the champion by the rule stays
challenger: tests/test_register.py.)"""

import json
from collections import Counter
from pathlib import Path

import mlflow
import pandas as pd
import yaml

from tests.bad_web import image_server
from tests.test_runner import QUICK, unclip

SHARD = 50  # ingest.shard_size below: the first run fills shards 0 and 1, each new list one more
# no train_clip (a random CLIP) and no upsampler (its warm start is the same loop as the others'),
# 4 steps a stage: minutes, not tens
SMALL = ["stages=[synth, ingest, embed, pca, train_prior, train_decoder, evaluate, register]", "embed.clip_from=config", "synth.n=100", "ingest.shard_size=50",
         "evaluate.real_images=64", "evaluate.num_prompts=6", "register.smoke_test=false",
         *(f"{stage}.{key}={value}" for stage in ("train_prior", "train_decoder")
           for key, value in (("steps", 4), ("checkpoint_every", 2), ("log_every", 2), ("warmup_steps", 1)))]


class CountingRoutes(dict):
    """The image server's routes, remembering each path it was asked for."""

    def __init__(self, *args):
        super().__init__(*args)
        self.hits = Counter()

    def get(self, path, default=None):
        self.hits[path] += 1
        return super().get(path, default)


def new_url_list(tmp_path: Path, name: str, seed: int, base: str, routes: CountingRoutes) -> Path:
    """SHARD more synthetic images (another seed) served under /<name>/, as a URL list parquet."""
    from tasks.synth import generate

    generate(tmp_path / name, SHARD, seed, image_size=128, progress=False)
    rows = pd.read_parquet(tmp_path / name / "captions.parquet")
    for path in rows["path"]:
        routes[f"/{name}/{path}"] = (200, {"Content-Type": "image/png"}, (tmp_path / name / path).read_bytes(), 0.0)
    rows["url"] = base + f"/{name}/" + rows["path"]
    url_list = tmp_path / f"{name}.parquet"
    rows[["url", "caption", "id", "split", "objects"]].to_parquet(url_list, index=False)
    return url_list


def counts(storage: Path, stage: str) -> dict:
    return json.loads((storage / stage / "_manifest.json").read_text())["counts"]


def logged_steps(client, storage: Path, stage: str) -> list[int]:
    run_id = (storage / stage / ".mlflow_run_id").read_text().strip()
    return sorted(m.step for m in client.get_metric_history(run_id, "lr"))  # the loop logs lr, the runner does not


def test_retrain_adds_only_new_shards_continues_from_the_champion_and_promotes_by_the_rule(tmp_path):
    storage = tmp_path / "s"
    unclip("run", QUICK, "--storage", storage, *(a for s in SMALL for a in ("--set", s)), cwd=tmp_path)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{storage}/mlflow.db")
    assert client.get_model_version_by_alias("unclip", "champion").version == 1
    assert client.get_model_version("unclip", "1").tags["unclip.step.decoder"] == "4"
    # v1's recorded metric, planted worse than any real one: the rule must promote the next version
    client.set_model_version_tag("unclip", "1", "unclip.metric.heldout/fd_clip", "1e9")
    ingest = storage / "ingest"
    first_shards = {p.name: p.stat().st_mtime_ns for p in sorted(ingest.glob("*.tar"))}
    assert list(first_shards) == ["00000.tar", "00001.tar"]

    routes = CountingRoutes()
    with image_server(routes) as base:
        more = new_url_list(tmp_path, "more", 1, base, routes)
        retrain = ("retrain", QUICK, "--storage", storage, *(a for s in SMALL for a in ("--set", s)))
        first = unclip(*retrain, "--new-urls", more, cwd=tmp_path)
        assert set(routes.hits) == set(routes)  # every new image, nothing else
        assert {p: (ingest / p).stat().st_mtime_ns for p in first_shards} == first_shards
        assert counts(storage, "ingest")["success"] == 150
        embed = counts(storage, "embed")
        assert (embed["shards_skipped_existing"], embed["shards_embedded"], embed["rows"]) == (2, 1, SHARD)
        for stage in ("train_prior", "train_decoder"):
            assert counts(storage, stage)["steps"] == 8, stage
            assert logged_steps(client, storage, stage) == [6, 8], stage  # from the champion's step 4
            assert json.loads((storage / stage / "training.json").read_text())["start_step"] == 4
        assert "registered unclip v2 (champion)" in first.stdout
        assert client.get_model_version_by_alias("unclip", "champion").version == 2
        assert client.get_model_version("unclip", "2").tags["unclip.step.prior"] == "8"

        again = unclip(*retrain, "--new-urls", more, cwd=tmp_path)  # the same data: nothing trains
        assert "nothing new" in again.stderr and "train_prior" not in again.stderr
        assert len(client.search_model_versions("name='unclip'")) == 2

    state = json.loads((storage / "_pipeline" / "retrain.json").read_text())
    assert [r["registered"]["version"] for r in state["retrains"]] == ["2"]
    config = yaml.safe_load((storage / "_pipeline" / "config.yaml").read_text())
    assert len(config["ingest"]["extra_url_lists"]) == 1
    assert "/_pipeline/champion/v1/" in config["train_decoder"]["init_from"]


def test_retrain_needs_a_finished_run_and_an_existing_list(tmp_path):
    no_run = unclip("retrain", QUICK, "--storage", tmp_path / "empty", "--new-urls", tmp_path / "x.parquet", cwd=tmp_path, check=False)
    assert no_run.returncode == 2 and "holds no pipeline run" in no_run.stderr
    (tmp_path / "s" / "_pipeline").mkdir(parents=True)
    (tmp_path / "s" / "_pipeline" / "config.yaml").write_text("name: x\n")
    missing = unclip("retrain", QUICK, "--storage", tmp_path / "s", "--new-urls", tmp_path / "x.parquet", cwd=tmp_path, check=False)
    assert missing.returncode == 2 and f"--new-urls {tmp_path / 'x.parquet'} does not exist" in missing.stderr


def test_an_inbox_folder_retrains_only_on_lists_the_run_does_not_have(tmp_path):
    from pipelines.retrain import file_digest, write_state

    storage, inbox = tmp_path / "s", tmp_path / "inbox"
    (storage / "_pipeline").mkdir(parents=True)
    (storage / "_pipeline" / "config.yaml").write_text("name: x\n")
    inbox.mkdir()
    empty = unclip("retrain", QUICK, "--storage", storage, "--new-urls", inbox, cwd=tmp_path, check=False)
    assert empty.returncode == 0 and "nothing new" in empty.stderr + empty.stdout
    pd.DataFrame({"url": ["http://127.0.0.1:9/a.png"], "caption": ["a red circle"]}).to_parquet(inbox / "a.parquet")
    (inbox / "notes.txt").write_text("not a list")
    write_state(storage, {"url_lists": [{"file": "a", "source": "a", "digest": file_digest(str(inbox / "a.parquet"))}], "retrains": []})
    known = unclip("retrain", QUICK, "--storage", storage, "--new-urls", inbox, cwd=tmp_path, check=False)
    assert known.returncode == 0 and "nothing new" in known.stderr + known.stdout
    pd.DataFrame({"url": ["http://127.0.0.1:9/b.png"], "caption": ["a blue square"]}).to_parquet(inbox / "b.parquet")
    new = unclip("retrain", QUICK, "--storage", storage, "--new-urls", inbox, cwd=tmp_path, check=False)
    assert new.returncode == 2 and "no registered model" in new.stderr  # b is new: it goes on to the champion


def test_appended_lists_follow_the_input_in_order_with_missing_columns_empty(tmp_path):
    from tasks.ingest import IngestConfig, read_url_list

    pd.DataFrame({"u": ["a", "b"], "c": ["A", "B"], "split": ["train", "heldout"]}).to_parquet(tmp_path / "1.parquet")
    pd.DataFrame({"u": ["c"], "c": ["C"]}).to_parquet(tmp_path / "2.parquet")
    cfg = IngestConfig(url_col="u", caption_col="c")
    rows = [read_url_list(cfg, str(tmp_path / f"{i}.parquet"), ["split"], all_columns=False) for i in (1, 2)]
    combined = pd.concat(rows, ignore_index=True)
    assert combined["url"].tolist() == ["a", "b", "c"] and combined["caption"].tolist() == ["A", "B", "C"]
    assert combined["split"].tolist()[:2] == ["train", "heldout"] and pd.isna(combined["split"][2])
