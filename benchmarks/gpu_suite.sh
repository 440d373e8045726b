#!/usr/bin/env bash
# The GPU measurements of issue 15 in one run: benchmarks/gpu_suite.sh OUT_DIR [DIFFUSERS_RESEARCH_DIR]
#
# Steps, most important first, each under its own time limit (`timeout`) and all within GPU_SUITE_BUDGET_S
# (default 540 s), so the suite ends inside one 10-minute call; a step that fails or runs out of time is recorded
# and the next one runs:
#   wheels    installs $GPU_SUITE_WHEELS/*.whl (default .bench-cache/wheels; if any) into WORK/site, for a machine
#             that lacks diffusers etc.
#   env       device, versions, whether torchvision / wandb / bitsandbytes import
#   build     random-weight SD 1.5 and SDXL models of the real shapes, their data, the fp16-fix SDXL VAE stand-in
#   compare-sd15, compare-sdxl
#             ours vs diffusers' research script (DIFFUSERS_RESEARCH_DIR/train_diffusion_dpo[_sdxl].py), same
#             model, data, batch, LoRA rank 8, fp16 (SD 1.5, 512 px) / bf16 (SDXL, 1024 px): steady-state s/step,
#             cold one-epoch wall (our precompute included), CUDA max allocated, nvidia-smi, RSS
#   variants  SD 1.5 LoRA at 8 and 16 pairs: fp16/bf16, channels-last, SDPA backends, regional and whole-UNet
#             torch.compile: s/step, TFLOP/s, MFU, peak memory
#   memory    the low-memory recipes of docs/low-memory.md under a 24 GB (SDXL) / 12 GB (SD 1.5) allocator cap
# Writes OUT_DIR/gpu_suite.json (all figures, device, date, versions, each step's exact command and status) and
# OUT_DIR/gpu_suite.log (every step's output). Work files go to GPU_SUITE_WORK (default: a new temporary folder).
#
# The research scripts are diffusers' examples/research_projects/diffusion_dpo/*.py, placed by a developer in an
# ignored folder (.bench-cache/diffusion_dpo/ by default; see benchmarks/README.md): the GPU machine has no network.
# Without them, or without torchvision, the comparison is skipped; without wandb, an import-only stand-in serves.
#
# CPU rehearsal: GPU_SUITE_PRESET=tiny benchmarks/gpu_suite.sh OUT_DIR (tiny models at 32 px, the same steps but no
# torch.compile variants; about 4 minutes on 2 cores). GPU_SUITE_SKIP="step ..." leaves steps out.
set -uo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 OUT_DIR [DIFFUSERS_RESEARCH_DIR]" >&2
    exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT_DIR=$(mkdir -p "$1" && cd "$1" && pwd)
RESEARCH_DIR=${2:-$REPO/.bench-cache/diffusion_dpo}
PRESET=${GPU_SUITE_PRESET:-gpu}
BUDGET_S=${GPU_SUITE_BUDGET_S:-540}
RESERVE_S=15 # kept for writing the JSON at the end
# modules the research scripts need that the suite cannot stand in for; a rehearsal with stand-in scripts sets ""
RESEARCH_IMPORTS=${GPU_SUITE_RESEARCH_IMPORTS-torchvision}
PYTHON=${PYTHON:-python3}
SKIP=${GPU_SUITE_SKIP:-} # step names to leave out (the CPU test leaves out the slowest)
WORK=${GPU_SUITE_WORK:-$(mktemp -d -t gpu-suite-XXXXXX)}
mkdir -p "$WORK"
LOG=$OUT_DIR/gpu_suite.log
STEPS=$WORK/steps.tsv
: >"$LOG"
: >"$STEPS"
SUITE=("$PYTHON" "$REPO/benchmarks/gpu_suite.py")
START=$SECONDS
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled

log() { echo "[gpu_suite $(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

record() { # NAME STATUS SECONDS LIMIT COMMAND...
    local name=$1 status=$2 seconds=$3 limit=$4
    shift 4
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$seconds" "$limit" "$*" >>"$STEPS"
}

# run_step NAME LIMIT_S COMMAND...: the command under `timeout`, its output appended to the log; the limit is
# shortened to what the budget has left, and a step with under 20 s left is skipped.
run_step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - RESERVE_S - (SECONDS - START)))
    if [[ " $SKIP " == *" $name "* ]]; then
        log "$name: skipped (GPU_SUITE_SKIP)"
        record "$name" "skipped: GPU_SUITE_SKIP" 0 0 "$*"
        return
    fi
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 20 ]; then
        log "$name: skipped, ${left}s of the budget left"
        record "$name" "skipped: budget" 0 0 "$*"
        return
    fi
    log "$name: start (limit ${limit}s): $*"
    local begun=$SECONDS status
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    case $rc in
    0) status=ok ;;
    124 | 137) status="timed out after ${limit}s" ;;
    *) status="failed (exit $rc)" ;;
    esac
    log "$name: $status in $((SECONDS - begun))s"
    record "$name" "$status" "$((SECONDS - begun))" "$limit" "$*"
}

log "preset $PRESET, budget ${BUDGET_S}s, work folder $WORK, research scripts $RESEARCH_DIR"
cd "$REPO" || exit 1

shopt -s nullglob
wheels=("${GPU_SUITE_WHEELS:-$REPO/.bench-cache/wheels}"/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
    run_step wheels 60 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "${wheels[@]}"
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi

run_step env 60 "${SUITE[@]}" env "$WORK" --preset "$PRESET"
if [ "$PRESET" = gpu ]; then build_limit=150; else build_limit=120; fi
run_step build "$build_limit" "${SUITE[@]}" build "$WORK" --preset "$PRESET"

missing=""
for module in $RESEARCH_IMPORTS; do
    "$PYTHON" -c "import $module" 2>/dev/null || missing="$missing $module"
done
for family in sd15 sdxl; do
    if [ "$family" = sdxl ]; then script=train_diffusion_dpo_sdxl.py limit=170; else script=train_diffusion_dpo.py limit=110; fi
    if [ ! -f "$RESEARCH_DIR/$script" ]; then
        log "compare-$family: skipped, no $RESEARCH_DIR/$script"
        record "compare-$family" "skipped: no research script" 0 0 "$RESEARCH_DIR/$script"
    elif [ -n "$missing" ]; then
        log "compare-$family: skipped, the research script needs${missing}, which does not import"
        record "compare-$family" "skipped: missing${missing}" 0 0 "import${missing}"
    else
        run_step "compare-$family" "$limit" "${SUITE[@]}" compare "$WORK" "$family" "$RESEARCH_DIR" --preset "$PRESET"
    fi
done

run_step variants 170 "${SUITE[@]}" variants "$WORK" --preset "$PRESET"
run_step memory 120 "${SUITE[@]}" memory "$WORK" --preset "$PRESET"

# merge is never skipped: it writes what the steps left
timeout 60 "${SUITE[@]}" merge "$WORK" "$OUT_DIR/gpu_suite.json" --preset "$PRESET" >>"$LOG" 2>&1
log "merge: exit $? (total $((SECONDS - START))s); $OUT_DIR/gpu_suite.json"
