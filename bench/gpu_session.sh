#!/usr/bin/env bash
# Issue 31's GPU measurements in one call of the device tool: at most 9.5 minutes (its two timeouts) plus
# the machine's start; a session is lent 15 device minutes in all, so run it once, with timeout_s 600, and give back.
#
# Here, before the call (the device image has torch but not pooch, platformdirs or pycocotools, and no data):
#   echo /.whl/ >> .git/info/exclude; echo /.gpu/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pycocotools pooch platformdirs  # pooch needs platformdirs; the rest is there
#   mkdir -p .gpu/kvasir-seg && cp -r ../shared/data/kvasir-seg/images ../shared/data/kvasir-seg/kavsir_bboxes.json .gpu/kvasir-seg/
# The call: run(command="bash bench/gpu_session.sh", carry=[".whl", ".gpu"], timeout_s=600)
# Locally, the same plumbing in a minute on CPU: OUT=/tmp/gpu bash bench/gpu_session.sh --small
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || { echo "could not install the carried wheels (.whl)"; exit 1; }
fi
[ -d .gpu/kvasir-seg ] && export MTML_SHARED_DATA="$PWD/.gpu"
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi (CPU)"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
small=""; smoke=""
[ "${1:-}" = "--small" ] && small="--small" && smoke="--smoke"
# 1. the GPU check: rates, AMP ratio, deterministic kernels' cost and pairing, one tiny study run
timeout 420 "$PY" bench/gpu_check.py --steps 5 $small --out "$OUT/gpu_check.md" 2>&1 | tee "$OUT/gpu_check.log"
# 2. where one tiny study run's time goes on this device
timeout 150 "$PY" bench/profile_run.py studies/kvasir_tiny_cpu.yaml --mode kd_ml $smoke --out "$OUT/profile_gpu.md" 2>&1 \
  | tee "$OUT/profile_gpu.log"
echo "written: $OUT/gpu_check.md, $OUT/profile_gpu.md (logs beside them)"
