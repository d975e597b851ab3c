#!/usr/bin/env bash
# Run benchmarks/gpu_check.py on a GPU machine: install carried wheels (pydantic and its dependencies, from
# $WHEELS, default .whl/; see README "GPU check") into /tmp/site if there are any, put the repository on
# PYTHONPATH, and keep the whole log beside the results. Arguments are passed on, e.g. `bash benchmarks/gpu_check.sh --budget 300`.
#   OUT=/some/dir bash benchmarks/gpu_check.sh          # results in $OUT (default benchmarks/results/gpu_check)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_check}"
export OUT
mkdir -p "$OUT"
WHEELS="${WHEELS:-.whl}"  # folder of carried wheels
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"${PYTHON:-python3}" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
