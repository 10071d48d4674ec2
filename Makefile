# Concord: two commands for users (`make demo`, `make test`), a few for developers.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Open MPI refuses to run as root unless told; harmless otherwise.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1

.PHONY: install demo test test-gym-lower bench clean

install: $(STAMP)

# Re-install when the package metadata or the pins change. torch is pinned to the CPU build in
# constraints.txt; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# A protocol comparison on the RESCO 4x4 grid (one simulated hour, 5 seeds, 2 processes): rule-based
# coordination beside the trained policies shipped in results/reference/checkpoints/ (full and
# local sensing, with and without learned messages), under a perfect channel and 30% loss; then its
# report: Markdown/CSV/LaTeX tables and figures in results/demo/report/.
CKPT := results/reference/checkpoints
demo: $(STAMP)
	$(BIN)/marl compare traffic/grid4x4 --controllers max-pressure,max-pressure-coordinated \
	    --protocols none,neighbours,broadcast --channel drop=0 --channel drop=0.3 \
	    --policy idqn=$(CKPT)/grid4x4-full-idqn.pt --policy ippo+tarmac=$(CKPT)/grid4x4-full-ippo-tarmac.pt \
	    --policy ippo-local=$(CKPT)/grid4x4-local-ippo-none.pt \
	    --policy ippo+commnet-local=$(CKPT)/grid4x4-local-ippo-commnet.pt \
	    --seeds 5 --jobs 2 --out results/demo
	$(BIN)/marl report results/demo --metric delay --metric throughput

# Lint, format and type checks first (seconds), then the whole pytest suite.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# The oldest gymnasium Concord declares (RLlib 2.60's): the ecosystem-facing tests on it, about a
# minute. gymnasium 1.2.2 goes into .gym-lower/ (git-ignored) and shadows the venv's copy.
GYM_LOWER := 1.2.2
test-gym-lower: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps --target .gym-lower gymnasium==$(GYM_LOWER)
	PYTHONPATH=.gym-lower $(BIN)/python -c "import gymnasium as g; assert g.__version__ == '$(GYM_LOWER)', g.__version__"
	PYTHONPATH=.gym-lower $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_conformance.py \
	    tests/test_examples.py -k "aec or state or supersuit or examples or torchrl or sb3"

bench: $(STAMP)
	$(BIN)/marl bench traffic traffic/grid4x4

clean:
	rm -rf $(VENV) .gym-lower .pytest_cache build *.egg-info
