# Two entry points: `make demo` (end to end on scikit-learn's digits) and `make test`.
# Both create .venv when it is missing. CPU torch is pinned through constraints.txt so
# pip takes the local CPU wheel instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test demo system-deps clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt 'torch==2.13.0'
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps pytorch-ood==0.4.0
	touch $(STAMP)

# System packages the tests use: Fashion-MNIST (Debian's dataset-fashion-mnist), a real Prometheus
# with promtool (Debian's prometheus) and headless Chromium (the audit report renders in it).
# Installed when missing and root; otherwise the tests that need them are skipped with a message
# saying how to get them. The serving and reliability benchmarks also want `hey` (not the tests).
DEB_PACKAGES := dataset-fashion-mnist prometheus chromium
system-deps:
	@missing=""; \
	[ -d /usr/share/datasets/fashion-mnist ] || missing="$$missing dataset-fashion-mnist"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages:$$missing"; \
		(apt-get install -y -qq --no-install-recommends $$missing >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null)) || \
		echo "note: could not install$$missing; tests that need them will be skipped"; \
	fi

test: setup system-deps
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python -m ncguard.cli.demo

clean:
	rm -rf $(VENV) demo-out .pytest_cache
