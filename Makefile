# The two commands a newcomer types (README.md): `make demo` and `make test`.
# Each creates .venv and installs everything it needs from scratch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/fmnist

.PHONY: demo test bench venv fmnist clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST: a local copy (--config.data_dir, LFMJAX_DATA_DIR, Debian's
# /usr/share/datasets/fashion-mnist, the cache) or the official download; failing
# those, Debian's package dataset-fashion-mnist where apt-get can install it.
fmnist: venv
	@$(PY) -c "from lfmjax.data import load_dataset; load_dataset('fashion_mnist')" 2>/dev/null \
	  || { echo "Fashion-MNIST not found: installing Debian's dataset-fashion-mnist"; \
	       (apt-get install -y -qq dataset-fashion-mnist || \
	        (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; }

demo: venv fmnist
	$(PY) -m lfmjax.main --config=configs/fmnist.py --workdir=$(WORKDIR)

test: venv
	$(PY) -m pytest -q -n 2 --dist worksteal tests

# The round on the paths users run against the PyTorch peer (BUILD.md: Speed; about 25 min).
bench: venv
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) benchmarks/bench.py --iters 3 --repeats 2 --out runs/bench

clean:
	rm -rf $(VENV) runs .pytest_cache
