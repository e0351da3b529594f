# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test test-fast test-oldest bench install bytecode clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	# PyTorch (CPU build) is only a second test oracle and benchmark peer: optional.
	-$(BIN)/python -m pip install -q -e ".[compare]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# What pip does for an installed wheel, for the editable sources: where the environment sets
# PYTHONDONTWRITEBYTECODE, every start would otherwise compile graphc's ~90 modules afresh
# (~0.3 s of each first call). Stale files are redone; compileall skips the fresh ones.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q graphc ir passes backends

demo: $(STAMP) bytecode
	$(BIN)/python examples/demo.py

# Everything, slow tests included (CI runs this).
test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# The suite again on the lowest numba, llvmlite and numpy pyproject.toml allows (its `>=` floors,
# read from it, pinned with `==`): a declared floor is one the whole suite passed on.
OLDEST       := .venv-oldest
OLDEST_PINS   = $(shell sed -nE 's/^ *"(numba|llvmlite|numpy)>=([0-9.]+)",?/\1==\2/p' pyproject.toml)
OLDEST_STAMP := $(OLDEST)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

$(OLDEST_STAMP): pyproject.toml
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q --upgrade pip
	$(OLDEST)/bin/python -m pip install -q $(OLDEST_PINS) -e ".[dev]"
	-$(OLDEST)/bin/python -m pip install -q $(OLDEST_PINS) -e ".[compare]"
	rm -f $(OLDEST)/.installed-*
	touch $@

test-oldest: $(OLDEST_STAMP)
	$(OLDEST)/bin/python -m pip freeze | grep -iE '^(numba|llvmlite|numpy)=='
	$(OLDEST)/bin/python -m pytest -q tests

# The peers (extra `peers`) may not move graphc's own Numba: PyTensor's newest release pins an older one.
bench: $(STAMP) bytecode
	$(BIN)/python -m pip freeze | grep -iE '^(numba|llvmlite|numpy)==' > $(VENV)/pins.txt
	-$(BIN)/python -m pip install -q -c $(VENV)/pins.txt -e ".[peers]"
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) $(OLDEST) build *.egg-info .pytest_cache
