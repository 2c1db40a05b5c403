"""What the runner hands a stage: where to write, where its inputs are, how to report.

Tasks never import `pipelines`; the runner builds a StageContext and calls
`task.run(stage_config, ctx) -> dict[str, float]` (counts and timings that go to the
manifest and to the stage's MLflow child run, which is the active run while `run` executes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


# Written into a stage's out_dir, atomically and last, by the runner once the stage finished: a
# directory without it is not a finished output (an input's manifest says how it was made).
MANIFEST = "_manifest.json"

# Mark a config field that changes how fast a stage runs, not what it writes:
# `Field(2, ge=1, json_schema_extra=EXECUTION_ONLY)`. Changing it does not invalidate the output.
EXECUTION_ONLY = {"execution_only": True}
# Mark a field that lists more input data (URL lists appended by `unclip retrain`): it is not one of
# the stage's settings, so an incremental stage keeps its output when it grows; the runner
# fingerprints the data it names through the stage's external inputs instead.
APPENDED_INPUT = {"appended_input": True}


@dataclass(frozen=True)
class StageContext:
    name: str  # stage name, e.g. "embed"
    storage: Path  # pipeline output root
    out_dir: Path  # <storage>/<name>/, exists; empty unless the stage is incremental
    inputs: dict[str, Path] = field(default_factory=dict)  # upstream stage name -> its out_dir
    seed: int = 0
    show_progress: bool = True  # progress bars on long work
    run_started: float | None = None  # time.time() when the pipeline run began (None: a stage run alone)
    # Where a training stage's Ray Train checkpoints go, when not in out_dir: the stage's folder in an object
    # store and its pyarrow filesystem, so an interrupted stage resumes on any machine
    checkpoint_path: str | None = None
    checkpoint_filesystem: Any = None
    # On a cluster whose other nodes keep their own copy of storage (object-store storage, no shared
    # folder; pipelines.nodes): the node this driver runs on, where a stage's workers must write
    # output, and what copies a file or folder the stage made to those copies before workers read it.
    driver_node_id: str | None = None
    copy_to_nodes: Callable[[Path], None] | None = None

    def share_with_workers(self, path: Path) -> None:
        """Make a file or folder this stage wrote (or an external input) readable by its workers on
        every node; nothing to do where every node sees storage."""
        if self.copy_to_nodes is not None:
            self.copy_to_nodes(Path(path))

    def input(self, stage: str) -> Path:
        if stage not in self.inputs:
            raise KeyError(f"stage {self.name!r} needs the output of {stage!r}, which this run does not provide")
        return self.inputs[stage]


def one_line(error: BaseException) -> str:
    """An error for a one-line message: its type and first line; for a failed connection, just
    the OS's reason."""
    text = str(error).strip()
    reason = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    return f"{type(error).__name__}: {reason.group(0) if reason else (text.splitlines() or [''])[0]}"[:300]
