# Two commands a newcomer needs: `make serve` and `make test`.
# Both build the virtualenv (CPU torch, generated stubs) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# APCM_MODEL (the server's own env variable) is honoured; MODEL=... overrides both.
ifdef APCM_MODEL
MODEL ?= $(APCM_MODEL)
endif
MODEL ?=
# Two stamps: serving needs .[server,agent] + torch (agent: `apcm mcp`); tests need
# the eval and dev extras.
SERVE_STAMP := $(VENV)/.installed-server
STAMP := $(VENV)/.installed

.PHONY: serve test install lint stubs clean bench image-check

$(SERVE_STAMP): pyproject.toml setup.py $(wildcard proto/apcm/v1/*.proto)
	@echo ">> [1/3] creating the virtualenv $(VENV) (seconds)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@echo ">> [2/3] installing torch $(TORCH_VERSION) (CPU wheel, ~750 MB installed; a few minutes on a fresh clone)"
	# A pinned CPU wheel: an open torch range would pull a multi-GB CUDA build.
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	@echo ">> [3/3] installing the server and the MCP tools (.[server,agent]: transformers, faiss, numba, mcp, ...) and generating the gRPC stubs (a minute or two)"
	$(PIP) install -q -e ".[server,agent]"
	@echo ">> installed; next: the server loads its model (seconds) and logs each start-up stage"
	touch $(SERVE_STAMP)

$(STAMP): $(SERVE_STAMP)
	@echo ">> installing the eval and dev extras (faiss, scikit-image, mypy, ...) for tests"
	$(PIP) install -q -e ".[server,agent,eval,dev,cluster]"
	touch $(STAMP)

install: $(STAMP)

# Regenerate the apcm.v1 stubs after editing proto/ (the editable install runs protoc).
stubs: $(STAMP)
	$(PIP) install -q --no-deps -e .

serve: $(SERVE_STAMP)
	$(VENV)/bin/apcm serve $(if $(MODEL),--model $(MODEL))

test: $(STAMP)
	$(VENV)/bin/ruff check server client wire tools tests scripts deploy examples
	$(PY) -m pytest -q

# Imports inside each package are relative, so mypy reads the folders as they are
# (server, client, wire, tools); gen/ gives it the generated apcm.v1 stubs.
lint: $(STAMP)
	$(VENV)/bin/ruff check server client wire tools tests scripts deploy examples
	MYPYPATH=gen $(VENV)/bin/mypy --config-file pyproject.toml -p server -p client -p wire -p tools

# Build the Dockerfile without Docker (debootstrap base, buildah chroot + vfs), start it,
# wait for SERVING and do a round trip (docs/deploy.md). Root, debootstrap and buildah;
# minutes, so not part of `make test`.
image-check: $(SERVE_STAMP)
	scripts/build_image.sh

bench: $(STAMP)
	$(VENV)/bin/apcm bench all --out docs/bench

clean:
	rm -rf $(VENV) gen build *.egg-info
