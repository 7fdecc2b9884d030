# Two entry points for a fresh machine (see README):
#   make demo   -- set up .venv and run the main job (protoseg demo)
#   make test   -- set up .venv with the framework extras and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test setup setup-test clean

$(VENV)/.core: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

DEEPBRAIN_WHEEL := .cache/wheels/deepbrain-0.1-py3-none-any.whl
export PROTOSEG_DEEPBRAIN_WHEEL ?= $(CURDIR)/$(DEEPBRAIN_WHEEL)

$(VENV)/.test: $(VENV)/.core pyproject.toml
	$(PY) -m pip install --quiet -e ".[torch,tensorflow,test,monai,dask]"
	@# nnU-Net's networks (the nnunet extra) without timm/einops: only transformer architectures need
	@# them, and timm pulls torchvision; the U-Nets need torch and numpy, installed above
	$(PY) -m pip install --quiet --no-deps "dynamic-network-architectures>=0.3"
	@# deepbrain's wheel (MIT) only for the test that reproduces the shipped ONNX conversion
	test -f $(DEEPBRAIN_WHEEL) || $(PY) -m pip download --quiet --no-deps deepbrain==0.1 -d .cache/wheels
	@# headless Chromium for the report's browser test (Debian package; needs root or sudo)
	command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "warning: could not install chromium; browser tests will skip" >&2; }
	touch $@

setup: $(VENV)/.core
setup-test: $(VENV)/.test

demo: $(VENV)/.core
	$(VENV)/bin/protoseg demo -o protoseg-demo

test: $(VENV)/.test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .numba_cache protoseg-demo
