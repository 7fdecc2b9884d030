# Two entry points for a fresh machine (see README):
#   make demo   -- set up .venv and run the main job (protoseg demo)
#   make test   -- set up .venv with the framework extras and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test setup setup-test setup-eval clean

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

# The estimator evaluation (docs/estimation.md): the [eval] extra (nilearn's MNI152 template,
# torch) and the pyradiomics 3.0.1 sdist's CT volumes (BSD-3; not an installable package, and
# 3.1.0's sdist reports a different version in its metadata, which pip refuses), unpacked into
# .cache/pyradiomics/. The experiments read them there and never download.
PYRADIOMICS_SDIST := .cache/sdists/pyradiomics-3.0.1.tar.gz

$(VENV)/.eval: $(VENV)/.core pyproject.toml
	$(PY) -m pip install --quiet -e ".[eval]"
	@# --no-build-isolation: pip reads the sdist's metadata with setup.py, which imports numpy
	test -f $(PYRADIOMICS_SDIST) || $(PY) -m pip download --quiet --no-deps --no-binary pyradiomics --no-build-isolation pyradiomics==3.0.1 -d .cache/sdists
	$(PY) -c "import tarfile, pathlib; t = tarfile.open('$(PYRADIOMICS_SDIST)'); \
	  ms = [m for m in t.getmembers() if m.name.count('/') == 1 and m.name.endswith('/LICENSE.txt') or m.name.count('/') == 2 and '/data/' in m.name and m.name.endswith('.nrrd')]; \
	  [setattr(m, 'name', m.name.split('/', 1)[1]) for m in ms]; t.extractall('.cache/pyradiomics', members=ms, **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))"
	touch $@

setup-eval: $(VENV)/.eval

demo: $(VENV)/.core
	$(VENV)/bin/protoseg demo -o protoseg-demo

test: $(VENV)/.test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .numba_cache protoseg-demo
