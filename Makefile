# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

# Main job on bundled material: fine-tune LoRA over a 1.5-bit LowRA base of pycode-llama-17m
# (LoftQ init, 60 steps), then perplexity before/after quantization and after fine-tuning.
# Re-running continues the run in runs/demo (resume) instead of refusing its checkpoints.
demo: setup
	$(PY) train.py --config=configs/demo.py --config.train.resume=True
	$(PY) eval.py --config=configs/demo.py

# The suite runs on 8 simulated CPU devices (tests/conftest.py), so the sharding and multi-host
# tests (test_sharding.py, test_multihost.py) are part of it.
test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis runs
