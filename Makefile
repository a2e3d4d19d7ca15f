# Two commands for a fresh machine:
#   make demo   installs cmma into .venv and runs the pipeline on the built-in sample (no network, no key)
#   make test   installs cmma with its test extras into .venv and runs the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
WS     ?= data/demo

.PHONY: install demo test clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned by constraints.txt so pip never swaps in another build (here: the local CPU wheel)
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt torch
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/cmma fetch -w $(WS)
	$(BIN)/cmma preprocess -w $(WS)
	$(BIN)/cmma train -w $(WS) --run demo --epochs 20
	$(BIN)/cmma embed -w $(WS) --run demo
	$(BIN)/cmma evaluate -w $(WS) --run demo --baseline-epochs 10
	$(BIN)/cmma retrieve -w $(WS) --run demo -k 5 "Rock salt structure: sodium is bonded to six equivalent chlorine atoms forming corner and edge-sharing octahedra."

test: $(VENV)/.installed
	$(BIN)/pytest -q

clean-demo:
	rm -rf $(WS)
