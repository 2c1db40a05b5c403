"""Progress bars that stay readable in a log.

In a terminal: a tqdm bar. Anywhere else (`ray job logs`, a CI log, a file) each of tqdm's
carriage-return redraws would become a line of its own, ten a second; there the same bar is one
plain line every `LOG_INTERVAL_S` seconds and one at the end, e.g.
`embed: shards 2/3 (67%), 00:50 elapsed, 00:25 left, 16.7s/shard`.
"""

from __future__ import annotations

import sys
from typing import Iterable, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str, initial: int = 0,
             enabled: bool = True, interactive: bool | None = None, file: TextIO | None = None) -> tqdm:
    """A tqdm bar; `interactive` (default: is stderr a terminal?) picks the bar or log lines."""
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    file = file or sys.stderr
    if interactive is None:
        interactive = file.isatty()
    if interactive:
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=file)
    fmt = ("{desc} {n_fmt}/{total_fmt} ({percentage:.0f}%), {elapsed} elapsed, {remaining} left, {rate_fmt}"
           if total is not None or hasattr(iterable, "__len__") else "{desc} {n_fmt}, {elapsed} elapsed, {rate_fmt}")
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=_Lines(file), bar_format=fmt,
                mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S)


class _Lines:
    """A file for tqdm that makes each redraw one line: no carriage returns, no padding, no repeats."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line and line != self.last:
            self.stream.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.stream.flush()
