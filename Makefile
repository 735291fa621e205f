# Two commands do everything, set-up included:  make demo  |  make test
# Set-up is idempotent: .venv, torch (the machine's own if it has one, else torch==2.13.0),
# and msconv in editable mode with its dev extras, built without build isolation (isolation
# would pull a multi-GB CUDA torch). Sources changing triggers a rebuild of msconv._C.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.msconv-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.h)
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench bench-paper gpu-check clean

setup: $(STAMP)

$(VPY):
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "using the machine's torch: $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV) && $(VPY) -m pip install -q torch==2.13.0; \
	fi

$(STAMP): $(VPY) $(SOURCES)
	$(VPY) -m pip install -q setuptools wheel pybind11 ninja numpy
	$(VPY) -m pip install -q --no-build-isolation -e ".[dev]"
	@touch $(STAMP)

# The defaults on the bundled photographs, as `msconv compare` runs them for a user: Full-Multiscale
# against single-scale and the baselines (small patches, progressive resizing, progressive patches),
# denoising (sigma 25), DnCNN 8x32, 128^2 crops, 1200 work units per mode. One intra-op thread
# (DEMO_THREADS): on a shared or small machine more threads contend and make small coarse steps several
# times slower; the README's table of this command was measured with it.
DEMO_THREADS ?= 1
demo: $(STAMP)
	$(VPY) -m msconv compare --out runs/demo --threads $(DEMO_THREADS)

test: $(STAMP)
	$(VPY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(VPY) -m msconv bench all

# The paper experiments (issue 7): CSV/JSON/plots into bench/results/paper_*/. Needs ../shared/data
# (Train400, BSD68, Set5, Set14); about 1.5 h on one CPU core, each script also runs alone.
PAPER := paper_transfer paper_denoise paper_tasks paper_curves paper_variance paper_large_batch
bench-paper: $(STAMP)
	@for s in $(PAPER); do echo "== bench/$$s.py"; $(VPY) bench/$$s.py || exit 1; done

# One command on a GPU machine, no package registry needed: build with the CUDA kernels (pip
# --no-deps --no-index), GPU tests, kernel benchmarks and a short single vs Full-Multiscale training
# run, each step with its own timeout, under 8 minutes; results in bench/results/gpu/<device>/.
# Uses the machine's torch (through a --system-site-packages .venv when one can be made, else the
# machine's python itself). GPU_CHECK_ARGS=--dry-run shows the plan and simulates it on any machine.
GPU_CHECK_ARGS ?=
gpu-check:
	@if [ ! -x $(VPY) ] && $(PYTHON) -c "import torch" 2>/dev/null; then \
	  $(PYTHON) -m venv --system-site-packages $(VENV) || rm -rf $(VENV); \
	fi; \
	py=$(VPY); if [ ! -x $$py ] || ! $$py -c "import torch" 2>/dev/null; then py=$(PYTHON); fi; \
	echo "gpu-check with $$py"; \
	PIP_BREAK_SYSTEM_PACKAGES=1 $$py bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build dist *.egg-info msconv/_C*.so wheelhouse
