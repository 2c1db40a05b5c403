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

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(VENV)/bin/unclip run pipelines/configs/demo.yaml

test: install
	$(VENV)/bin/pytest -q --durations=15

clean:
	rm -rf outputs .pytest_cache
