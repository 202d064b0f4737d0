#!/usr/bin/env bash
# Prepare .gpu/ (git-ignored) for bench/gpu_check.py on a GPU machine that cannot reach a package index or a
# model hub: the wheels its Python lacks (pinned as in scripts/constraints.txt) and the parent's shape (config and
# tokenizer of the embedded SmolLM2-135M; gpu_check.py draws random weights of that shape, which is all a speed
# figure needs). Needs .venv (scripts/setup.sh) and PyPI. About 25 MiB. On the GPU machine, from the repo root:
#
#   pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site
#   python3 bench/gpu_check.py --shape .gpu/smollm2-135m --out "$OUT"
#
# PACKAGES names what the GPU image lacked when this was written (torch, accelerate, peft, safetensors, tokenizers,
# pyyaml, tqdm, numpy are there); transformers is carried for the version the tests pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=${PACKAGES:-"transformers huggingface-hub tokenizers deepspeed omegaconf hjson pydantic pydantic_core annotated-types typing-inspection peft"}
PYVER=${GPU_PYTHON:-3.12}
mkdir -p .gpu/wheels
for name in $PACKAGES; do
  pin=$(grep -i "^$(echo "$name" | sed 's/[-_]/[-_]/g')==" scripts/constraints.txt | head -1 || true)
  [ -n "$pin" ] || { echo "error: $name is not in scripts/constraints.txt; add its pin first" >&2; exit 2; }
  if [ "$name" = deepspeed ]; then  # an sdist only: build a pure-Python wheel (ops compile just in time there)
    DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .gpu/wheels "$pin"
  else
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .gpu/wheels "$pin"
  fi
done
.venv/bin/python - <<'EOF'
from transformers import AutoConfig

from adapt.recipe.config import ModelConfig
from adapt.model.causal import load_tokenizer, resolve_source

mcfg = ModelConfig()
load_tokenizer(mcfg).save_pretrained(".gpu/smollm2-135m")
source, gguf = resolve_source(mcfg.name_or_path, mcfg.gguf_file)  # the config alone, read from the GGUF header
AutoConfig.from_pretrained(source, gguf_file=gguf).save_pretrained(".gpu/smollm2-135m")
EOF
du -sh .gpu
