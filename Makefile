# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
# Offline and quiet: no telemetry, Ray bound to loopback without an auth token, no hub lookups.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK := true
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled
export HF_HUB_OFFLINE := 1

.PHONY: demo test install clean ray-head ray-stop

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(VENV)/bin/unclip run pipelines/configs/demo.yaml

# Two workers, a file each at a time (module fixtures run once), slow files first (tests/conftest.py):
# half of a test's time alone is Ray and process start-up, which the other worker's test fills.
test: install
	$(VENV)/bin/pytest -q --durations=15 -n 2 --dist loadfile --no-loadscope-reorder

# A local Ray head for `ray job submit` (README "On a Ray cluster"). A job's entrypoint runs with
# the environment of the process that started the head, so the venv's bin goes first on its PATH
# (that is where `unclip` is) and the exports above (loopback, no auth token, offline) apply too.
# Extra `ray start` flags: make ray-head RAY_HEAD_ARGS="--num-cpus 8 --dashboard-port 8266"
RAY_HEAD_ARGS ?=
ray-head: install
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/ray start --head --dashboard-host 127.0.0.1 --num-cpus 2 $(RAY_HEAD_ARGS)

# Stops every Ray instance this user runs on this machine (`ray stop` cannot pick one).
ray-stop:
	$(VENV)/bin/ray stop

clean:
	rm -rf outputs .pytest_cache
