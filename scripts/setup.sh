#!/usr/bin/env bash
# Set up .venv (if missing), torch 2.13.0 first, then interp with its dev extras, then the embedded model.
# Idempotent: each step is a no-op when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
V=.venv/bin/python
$V -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('${TORCH_VERSION:-2.13.0}') else 1)" 2>/dev/null \
  || $V -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# (re)install interp and its dependencies whenever pyproject.toml changed since the last install
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat .venv/.pyproject.sha256 2>/dev/null)" != "$want" ] || ! $V -c "import interp, pytest" 2>/dev/null; then
  $V -m pip install -q -e ".[dev]"
  echo "$want" > .venv/.pyproject.sha256
fi
$V -c "from interp.embedded import fetch; print(fetch())"  # the embedded model (a no-op when cached)
# Headless Chromium (Debian's package) for the report screenshot test; optional, skipped without apt/root.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "note: could not install chromium; the report screenshot test will be skipped"
fi
