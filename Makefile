# Two entry points (README.rst): `make run` and `make test`. Both build a
# virtualenv in .venv on first use so a fresh machine needs only python3, git and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= etc/cache.yaml
PYTEST_ARGS ?=
# The checkout on sys.path is what lets twistd find twisted/plugins/ here,
# whatever kind of editable install pip made.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: run test test-radosgw mypy bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# compat mode puts the checkout on sys.path, which is what lets twistd
	# discover twisted/plugins/sparkcache_plugin.py from the working tree.
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/twistd -n --pidfile= sparkcache -c $(CONFIG)

# worksteal: a worker that runs out of tests takes half of the other's queue,
# instead of waiting while the other works through a chunk of long e2e tests.
test: $(VENV)/.installed
	$(PY) -m mypy
	$(PY) -m pytest -n auto --dist worksteal -p no:cacheprovider -m "not radosgw" $(PYTEST_ARGS)

# The S3 store on Ceph's radosgw (tests/e2e/test_s3_radosgw.py): a job of its
# own, since it adds about a minute to the suite's wall time under xdist.
test-radosgw: $(VENV)/.installed
	$(PY) -m pytest -n auto -p no:cacheprovider -m radosgw tests/e2e/test_s3_radosgw.py $(PYTEST_ARGS)

mypy: $(VENV)/.installed
	$(PY) -m mypy

bench: $(VENV)/.installed
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) data
