#!/usr/bin/env bash
# Create .venv in the repository root from nothing and install bonn-sweep into it.
# torch is installed first, pinned to the CPU build (2.13.0), so the resolver never picks a CUDA build.
# Idempotent: a complete environment is left alone (stamp file keyed on pyproject.toml).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
# Headless Chromium for tests/integration/test_browser.py: Debian's chromium + chromium-driver, installed
# where apt-get is available and we are root (or have password-less sudo); elsewhere that test skips,
# saying why. BONN_SWEEP_NO_BROWSER=1 leaves it out.
if [ "${BONN_SWEEP_NO_BROWSER:-0}" != 1 ] && ! command -v chromedriver >/dev/null 2>&1 \
   && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ] && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
  if [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; then
    echo "[setup] installing chromium + chromium-driver (the browser test)" >&2
    apt_install() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      chromium chromium-driver >&2; }
    apt_install || { $SUDO apt-get update -q >&2 && apt_install; } \
      || echo "[setup] warning: chromium not installed; tests/integration/test_browser.py will skip" >&2
  fi
fi
stamp=".venv/.bonn-sweep-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating .venv and installing bonn-sweep (first time: ~3 min)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip's configuration on these machines names local index folders that may not exist; drop that noise.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet .venv/bin/python -m pip install -q --upgrade pip >&2
# CPU torch first: pinned, so nothing later can swap in a multi-GB CUDA build.
quiet .venv/bin/python -m pip install -q "torch==2.13.0" >&2
quiet .venv/bin/python -m pip install -q -e ".[dev]" >&2
echo "$want" > "$stamp"
echo "[setup] done" >&2
