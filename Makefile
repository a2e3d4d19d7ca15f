# Two commands for a fresh machine:
#   make demo   installs cmma into .venv and runs the pipeline on the built-in sample (no network, no key)
#   make test   installs cmma with its test extras into .venv and runs the test suite
#   make test-images  builds .venv-images (cmma[images,test] with a torch/torchvision pair built for each other,
#                     constraints-images.txt) and runs the image tests there; .venv and its pin stay as they are
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
WS     ?= data/demo

.PHONY: install demo test clean-demo images test-images

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

# The image modality (cmma[images]: timm, which needs torchvision) in a venv of its own: torchvision must be built
# for the torch beside it, which the CPU torch 2.13.0 of .venv has no PyPI match for. constraints-images.txt
# pins a pair that works on this machine's CPU; the import check fails the build if the pair breaks.
IMAGES_VENV ?= .venv-images
IMAGES_BIN  := $(IMAGES_VENV)/bin

$(IMAGES_BIN)/python:
	$(PYTHON) -m venv $(IMAGES_VENV)
	echo '*' > $(IMAGES_VENV)/.gitignore

$(IMAGES_VENV)/.installed: $(IMAGES_BIN)/python pyproject.toml constraints-images.txt
	$(IMAGES_BIN)/pip install --quiet --disable-pip-version-check -c constraints-images.txt torch torchvision
	$(IMAGES_BIN)/pip install --quiet --disable-pip-version-check -c constraints-images.txt -e ".[images,test]"
	$(IMAGES_BIN)/python -c "import torchvision, timm, sentence_transformers, transformers; \
	    print('torch', __import__('torch').__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__)"
	touch $@

images: $(IMAGES_VENV)/.installed

# the image tests (CMMA_REQUIRE_IMAGES=1: fail, not skip, if timm/torchvision do not import), plus the one elsewhere
# that takes its timm branch when timm is installed
test-images: $(IMAGES_VENV)/.installed
	CMMA_REQUIRE_IMAGES=1 $(IMAGES_BIN)/pytest -q tests/test_images.py \
	    "tests/test_model.py::test_the_image_modality_needs_timm_or_says_how_to_get_it"
