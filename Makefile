# Two commands do all set-up: `make demo` trains the built-in default, `make test` runs the tests.
# Both create .venv and install into it once. On this project's CPU machines `torch==2.13.0`
# resolves to the CPU build on disk; on GPU machines set TORCH (see README), e.g.
#   make demo TORCH="torch --index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: install
	$(BIN)/cotmi train

# Three workers, each taking a whole module at a time (module fixtures are shared by its tests): the
# others compute while one waits on process start-up, a collective timeout or Slurm. Modules go out
# in the order tests/conftest.py sorts them (longest first); xdist would otherwise send the modules
# with the most tests first and start the longest single test last. Serially: `make test PYTEST_ARGS=`.
PYTEST_ARGS ?= -n 3 --dist loadscope --no-loadscope-reorder

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
