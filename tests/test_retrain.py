"""`unclip retrain`'s input checks and inbox handling. The retrain itself, on a finished quick run:
tests/test_quick_run.py."""

import pandas as pd

from tests.test_runner import QUICK, unclip


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
