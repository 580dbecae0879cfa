# The two commands of the README:
#   make demo   set up .venv, synthesize phantoms, resample, train, segment, evaluate, report
#   make test   set up .venv with the test tools and run the default test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On this kind of machine pip finds torch 2.14.1 / torchvision 0.29.1 on the local disk; elsewhere
# it installs the PyPI build (CUDA-enabled on Linux).
PIP_TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= demo_out

.PHONY: demo test test-all bench ablation lint clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install $(PIP_TORCH) || $(PY) -m pip install torch torchvision
	$(PY) -m pip install -r requirements.txt
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) demo.py --out $(DEMO_OUT)

test: $(VENV)/.dev-installed
	$(PY) -m pytest -q

test-all: $(VENV)/.dev-installed
	$(PY) -m pytest -q -m "slow or not slow"

bench: $(VENV)/.installed
	$(PY) -m bench.run --out bench_results

ablation: $(VENV)/.installed
	$(PY) -m bench.ablation --out ablation_out

lint: $(VENV)/.dev-installed
	$(PY) -m ruff check .

clean:
	rm -rf $(DEMO_OUT) bench_results ablation_out .pytest_cache
