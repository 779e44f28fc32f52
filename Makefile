# Two commands a newcomer needs: `make serve` and `make test`.
# Both build the virtualenv (CPU torch, generated stubs) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
MODEL ?= model_weights/text-minilm.safetensors
STAMP := $(VENV)/.installed

.PHONY: serve test install lint stubs clean bench

$(STAMP): pyproject.toml setup.py $(wildcard proto/apcm/v1/*.proto)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# A pinned CPU wheel: an open torch range would pull a multi-GB CUDA build.
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[server,agent,eval,dev]"
	touch $(STAMP)

install: $(STAMP)

# Regenerate the apcm.v1 stubs after editing proto/ (the editable install runs protoc).
stubs: $(STAMP)
	$(PIP) install -q --no-deps -e .

serve: $(STAMP)
	$(VENV)/bin/apcm serve --model $(MODEL)

test: $(STAMP)
	$(VENV)/bin/ruff check server client wire tools tests scripts deploy
	$(PY) -m pytest -q

# mypy needs the apcm.* import names, which package-dir maps; a symlink tree gives it them.
lint: $(STAMP)
	$(VENV)/bin/ruff check server client wire tools tests scripts deploy
	rm -rf build/typecheck && mkdir -p build/typecheck/apcm && touch build/typecheck/apcm/__init__.py
	ln -s ../../../server build/typecheck/apcm/server
	ln -s ../../../client build/typecheck/apcm/client
	ln -s ../../../wire build/typecheck/apcm/wire
	ln -s ../../../tools build/typecheck/apcm/tools
	ln -s ../../../gen/apcm/v1 build/typecheck/apcm/v1
	cd build/typecheck && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml \
		-p apcm.server -p apcm.client -p apcm.wire -p apcm.tools

bench: $(STAMP)
	$(VENV)/bin/apcm bench all --out docs/bench

clean:
	rm -rf $(VENV) gen build *.egg-info
