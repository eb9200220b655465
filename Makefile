# Two entry points: `make demo` (end to end on scikit-learn's digits) and `make test`.
# Both create .venv when it is missing. CPU torch is pinned through constraints.txt so
# pip takes the local CPU wheel instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test demo data clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt 'torch==2.13.0'
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist; install it when missing and root.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) || \
		echo "note: could not install dataset-fashion-mnist; tests that need it will be skipped"; \
	fi

test: setup data
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python -m ncguard.demo

clean:
	rm -rf $(VENV) demo-out .pytest_cache
