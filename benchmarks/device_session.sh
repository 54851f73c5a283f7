#!/usr/bin/env bash
# One call of a lent GPU: the GPU check, then the quality benchmark's GPU preset in the time left.
#
#   bash benchmarks/device_session.sh OUT [SECONDS] [tiny]
#
# SECONDS (default 570) is the whole script's budget: the GPU check starts no piece after 240 s
# and stops at 300 s (a guard kills it at 330 s), and the quality benchmark gets what is left
# less 10 s (its --time_limit_s: it starts no cell the finished ones say cannot end in time and
# stops the running ones at the limit). Results: OUT/gpu_check/{rows.jsonl,summary.md,log.txt,
# scatter_ptx.txt} and OUT/quality/quality_<preset>.{csv,md,log} (7 files, within what the
# device tool brings back). "tiny" runs both on tiny shapes, on any CPU (BENCHMARKS.md §2,
# "Next device session", says how it was tested).
set -u
out=${1:?usage: bash benchmarks/device_session.sh OUT [SECONDS] [tiny]}
total=${2:-570}
mode=${3:-full}
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out/gpu_check" "$out/quality"
# The carried wheels (BENCHMARKS.md §2): without them the quality cells cannot start.
"$python" -c "import ml_collections, grain, tensorboardX" ||
  echo "WARNING: a carried wheel is missing; make .whl/ as BENCHMARKS.md §2 says"
if [ "$mode" = tiny ]; then
  budget=150
  check=(--preset tiny)
  quality=(--preset cpu --classes 20 --sets long_tail --seeds 0 1 --steps 2 --batch 2
           --image_size 32 --train_examples 8 --eval_examples 4 --jobs 2)
else
  budget=240
  check=()
  quality=(--preset gpu --jobs 4)
fi
timeout $((budget + 90)) "$python" -m benchmarks.gpu_check --output_dir "$out/gpu_check" \
  --budget_s "$budget" ${check[@]+"${check[@]}"}
echo "gpu_check ended (exit $?) at ${SECONDS} s"
"$python" -m benchmarks.gpu_check --output_dir "$out/gpu_check" --summarize
left=$((total - SECONDS - 10))
XLA_PYTHON_CLIENT_PREALLOCATE=false \
  JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxscaleseg-quality-cache} \
  "$python" -m benchmarks.quality "${quality[@]}" --time_limit_s $((left > 20 ? left : 20)) \
  --workdir "${QUALITY_WORKDIR:-/tmp/jaxscaleseg-quality}" --output_dir "$out/quality"
echo "quality ended (exit $?) at ${SECONDS} s"
