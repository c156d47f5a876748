# Two commands for a fresh machine with Python 3.11: `make demo` and `make test`.
# `make` alone builds the environment, .venv/; enter it with `source .venv/bin/activate`
# (every command in README.md runs in it), or call .venv/bin/python directly.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

# The stamp depends on the files that define the install, so editing them reinstalls.
# pip's own lines (Collecting, Downloading with a bar, Installing) show the progress.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	@echo "make: creating $(VENV) with $$($(PYTHON) --version)"
	$(PYTHON) -m venv $(VENV)
	@echo "make: updating pip"
	$(PY) -m pip install -q --upgrade pip
	@echo "make: installing torch, torchvision, DALI, pycocotools and the test tools into $(VENV) (about 5.5 GB, a few minutes)"
	$(PY) -m pip install --progress-bar on -c constraints.txt -e '.[dali,eval,export,dev]'
	touch $(STAMP)
	@echo "make: $(VENV) is ready; enter it with 'source $(VENV)/bin/activate' to run the commands in README.md"

# One line per test module with the share done (pytest's default), the slowest tests at the end.
test: $(STAMP)
	$(PY) -m pytest tests --durations=5

demo: $(STAMP)
	$(PY) tools/demo.py --out runs/demo

clean:
	rm -rf $(VENV) runs
