#!/usr/bin/env bash
# The GPU check, in two halves. A lent GPU machine has torch, numpy and scipy but not pydantic,
# and can fetch nothing, so the wheels and the model travel with the working tree.
#
#   bash benchmarks/gpu_check.sh prepare     # here: .whl/ (pydantic for CPython 3.12) and .gpu/model
#   # then one device call: command "bash benchmarks/gpu_check.sh run", carry [".whl", ".gpu"], timeout_s 300
#
# `run` writes $OUT/gpu_scoring.json (benchmarks/gpu_scoring.py) and $OUT/nvidia-smi.csv.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    for folder in /.whl/ /.gpu/; do
        grep -qxF "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >>.git/info/exclude
    done
    rm -rf .whl .gpu
    versions=$(.venv/bin/python -m pip list --format=freeze 2>/dev/null |
        grep -iE '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions)==')
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $versions
    .venv/bin/python benchmarks/gpu_scoring.py --export .gpu/model
    du -sh .whl .gpu
    ;;
run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    out=${OUT:-/tmp}
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia-smi.csv"
    python3 benchmarks/gpu_scoring.py --model .gpu/model --images 16 --repeats 3 --json "$out/gpu_scoring.json"
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
