"""What runs in which order: the workflow DAG, the runner, the CLI and the config schema."""

import os

# Read once, when ray is first imported. Ray Train's placement-group cleaner asks the State API
# every second whether the controller lives; the embedded cluster has no dashboard, so no State
# API, and the driver's log would repeat its warning for a whole training stage. The line still
# reaches the session's log files.
os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "Failed to query Ray Train Controller actor state")
