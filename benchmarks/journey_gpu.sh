#!/usr/bin/env bash
# The README's GPU path as a user runs it, timed: a diffusers model folder -> plan -> export -> inspect -> run
# on 2 GPUs. Needs accel installed (`pip install -e .`) and two GPUs.
#
#   benchmarks/journey_gpu.sh WORKDIR [BACKEND]        # BACKEND: inductor (default) or aot
#
# Without a model folder at WORKDIR/sdxl, one is written first: the full-size SDXL-base-1.0 architecture
# with random weights (fp16), saved with save_pretrained, so every step below loads it as any diffusers
# folder. Each command's output and wall time go to WORKDIR/journey.log.
set -euo pipefail
work=${1:?usage: journey_gpu.sh WORKDIR [BACKEND]}
backend=${2:-inductor}
mkdir -p "$work"
log="$work/journey.log"
: > "$log"

step() {
    local start=$(date +%s%N)
    echo "\$ $*" | tee -a "$log"
    "$@" 2>&1 | tee -a "$log"
    echo "wall $(( ($(date +%s%N) - start) / 1000000 )) ms: $1 $2" | tee -a "$log"
}

if [ ! -f "$work/sdxl/model_index.json" ]; then
    step python3 -c "from accel.testing import full_size_pipeline; full_size_pipeline('sdxl').save_pretrained('$work/sdxl')"
fi
step accel doctor
step accel plan "$work/sdxl" --height 1024 --width 1024 --devices 2 -o "$work/sdxl-1024.plan.json"
step accel inspect "$work/sdxl-1024.plan.json"
step accel export "$work/sdxl-1024.plan.json" --backend "$backend" -o "$work/engines"
step accel inspect "$work/engines"
step accel run "$work/sdxl-1024.plan.json" --backend "$backend" --engines "$work/engines" \
    -p "a fox in the snow" -o "$work/fox.png" --json
