"""Progress in a log (`ray job logs`, CI): plain lines at an interval, never carriage returns."""

import io
import subprocess
import sys
import time

from tasks import progress as progress_module
from tasks.progress import progress


def test_log_lines_are_plain_and_spaced(monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 0.2)
    log = io.StringIO()
    for _ in progress(range(40), desc="embed: shards", unit="shard", file=log, interactive=False):
        time.sleep(0.01)  # 0.4 s in all: the start, about two interval lines, the end
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and all(line == line.strip() and line for line in lines)
    assert lines[0].startswith("embed: shards 0/40 (0%)")
    assert lines[-1].startswith("embed: shards 40/40 (100%)")
    assert 2 <= len(lines) <= 5  # tqdm in a terminal would have redrawn ~40 times
    assert not any("█" in line or "|" in line for line in lines)  # no bar glyphs in a log


def test_resumed_count_and_unknown_total():
    log = io.StringIO()
    bar = progress(total=100, initial=60, desc="train_prior", unit="step", file=log, interactive=False)
    bar.update(40)
    bar.close()
    assert log.getvalue().splitlines()[-1].startswith("train_prior 100/100 (100%)")
    log = io.StringIO()
    for _ in progress(iter(range(3)), desc="read", unit="file", file=log, interactive=False):
        pass
    assert log.getvalue().splitlines()[-1].startswith("read 3,")


def test_terminal_gets_a_bar_and_disabled_prints_nothing():
    log = io.StringIO()
    for _ in progress(range(3), desc="synth", unit="img", file=log, interactive=True):
        pass
    assert "\r" in log.getvalue() and "3/3" in log.getvalue()
    log = io.StringIO()
    for _ in progress(range(3), desc="synth", unit="img", file=log, enabled=False):
        pass
    assert log.getvalue() == ""


def test_runner_messages_are_not_wrapped_in_a_log():
    """Rich wraps at 80 columns when stderr is not a terminal; a wrapped line breaks grep."""
    code = "from pipelines.runner import console; console.print('✓  ingest in 1.0 s: ' + ', '.join(f'count_{i}=1' for i in range(30)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert len(result.stderr.splitlines()) == 1
