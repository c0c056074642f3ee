#!/usr/bin/env bash
# Issue 31's GPU measurements in one call of the device tool: at most 8 minutes (its two timeouts),
# plus about a minute for pip and torch's start, plus the machine's start. A session is lent 15
# device minutes in all: run it once, with timeout_s 600, and give the machine back.
#
# Here, before the call (the device image has torch but not pooch, platformdirs or pycocotools, and no data):
#   echo /.whl/ >> .git/info/exclude; echo /.gpu/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pycocotools pooch platformdirs
#   (pooch needs platformdirs; the image has the rest)
#   mkdir -p .gpu/kvasir-seg && cp -r ../shared/data/kvasir-seg/images ../shared/data/kvasir-seg/kavsir_bboxes.json .gpu/kvasir-seg/
# The call: run(command="bash bench/gpu_session.sh", carry=[".whl", ".gpu"], timeout_s=600)
# Locally, the same plumbing in a minute on CPU: OUT=/tmp/gpu bash bench/gpu_session.sh --small
set -u -o pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || { echo "could not install the carried wheels (.whl)"; exit 1; }
fi
[ -d .gpu/kvasir-seg ] && export MTML_SHARED_DATA="$PWD/.gpu"
export PYTHONUNBUFFERED=1
# what the steps need, checked before minutes are spent: the carried packages and real frames
"$PY" -c "import pooch, platformdirs, pycocotools" || { echo "missing packages: carry .whl (this script's header)"; exit 1; }
"$PY" -c "from mtml.tasks.polyp import default_polyp_root; import sys; sys.exit(default_polyp_root()[0] is None)" \
  || { echo "no Kvasir-SEG frames: carry .gpu/kvasir-seg (this script's header)"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi (CPU)"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
small=""; smoke=""
[ "${1:-}" = "--small" ] && small="--small" && smoke="--smoke"
failed=0
step() {  # name, limit in seconds, command...: its output to $OUT/<name>.log; a timeout or failure is said and counted
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "$name: TIMED OUT after $limit s (what it measured so far is in $OUT)"
  [ "$rc" != 0 ] && { echo "$name: exit code $rc"; failed=$((failed + 1)); }
  return 0
}
# 1. the GPU check: rates, AMP ratio, deterministic kernels' cost and pairing, then one tiny study run (rows written as measured)
step gpu_check 360 "$PY" bench/gpu_check.py --steps 5 --ddp-timeout 60 $small --out "$OUT/gpu_check.md"
# 2. where a tiny study run's time goes on this device (2 epochs: the shares, not the total)
step profile_gpu 120 "$PY" bench/profile_run.py studies/kvasir_tiny_cpu.yaml --mode kd_ml --epochs 2 $smoke --out "$OUT/profile_gpu.md"
echo "in $OUT: gpu_check.md, gpu_check.ddp.log, profile_gpu.md and a log per step; $failed step(s) failed"
exit "$failed"
