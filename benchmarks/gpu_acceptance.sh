#!/usr/bin/env bash
# GPU acceptance in one call (issue 24): every stage, in order of value, within 540 s.
#
#   bash benchmarks/gpu_acceptance.sh                 # all stages on the GPU (results in $OUT)
#   bash benchmarks/gpu_acceptance.sh --dry-run       # the same plumbing on the CPU, every stage shrunk
#   bash benchmarks/gpu_acceptance.sh --stages env,record   # a subset (env first: it installs)
#   options: --budget SECONDS (whole call, default 540; dry run 400), --results DIR (where stage 6 copies
#            the record, default benchmarks/results), --work DIR (stage files before the copy)
#
# Stages (each under its own `timeout`; a stage that fails or times out leaves the others intact):
#   1 env          nvidia-smi, versions, the offline install (fallback: a shadow tree on PYTHONPATH)
#   2 correctness  GPU-marked kernel/engine tests, the TF32/bf16 error against cuBLAS's own error,
#                  compute-sanitizer memcheck of one small step, the sm_90 resource report
#   3 record       fastvae.bench.gpu: B 128/16384 x fp32/bf16 (+ TF32 at 128), eager, eager+graph,
#                  torch.compile (mode within a deadline), fastvae; kernels, per-kernel times, memory, epochs
#   4 sweep        `fastvae sweep` (issue 26) when it exists, else recorded as skipped
#   5 quality      pytorch-example 10 epochs fused vs reference; iwae for the remaining seconds, IW NLL k=5000
#   6 copy         README.md from the stage JSONs; the whole record copied to <results>/<gpu>-<date>/
#
# $OUT gets at most 3 files (the device tool returns 8): summary.md (rewritten at every stage start and
# end, so a call killed at its limit still says what ran), acceptance.tar.gz (every stage's JSON and log,
# repacked after each stage; `tar -xzf acceptance.tar.gz -C benchmarks/results` is stage 6's copy) and
# README.md (stage 6). Nothing here writes a number it did not measure.
#
# Test hooks (tests/test_gpu_acceptance.py): ACCEPT_FORCE_FAIL=<stage> makes that stage fail at once,
# ACCEPT_FORCE_HANG=<stage> makes it sleep past its limit, ACCEPT_LIMIT_<stage>=S overrides its limit.
set -uo pipefail
SELF=$(readlink -f "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SELF")/.." && pwd)
ACC=$REPO/benchmarks/acceptance
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
export PYTHON REPO ACC

if [ "${1:-}" = __body ]; then  # one stage's body, started by the orchestrator below under `timeout`
    # shellcheck source=benchmarks/acceptance/stages.sh
    source "$ACC/stages.sh"
    stage_body "$2"
    exit $?
fi

DRY=0 STAGES="env,correctness,record,sweep,quality,copy" BUDGET="" RESULTS=$REPO/benchmarks/results
WORK=${ACCEPT_WORK:-}
while [ $# -gt 0 ]; do
    case "$1" in
    --dry-run) DRY=1 ;;
    --stages) STAGES=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --results) RESULTS=$2; shift ;;
    --work) WORK=$2; shift ;;
    *) echo "gpu_acceptance.sh: unknown argument '$1' (see the header of $SELF)" >&2; exit 2 ;;
    esac
    shift
done
case "$BUDGET" in "") BUDGET=$([ "$DRY" = 1 ] && echo 400 || echo 540) ;; *[!0-9]*)
    echo "gpu_acceptance.sh: --budget takes whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-$(mktemp -d /tmp/fastvae-acceptance.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)

GPU=$( (timeout 10 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true) | head -n1)
SLUG=$(printf '%s' "${GPU:-cpu}" | tr 'A-Z' 'a-z' | sed -e 's/nvidia//; s/[^a-z0-9]\{1,\}/-/g; s/^-//; s/-$//')
SLUG=$(printf '%s' "$SLUG" | sed -e 's/-[0-9]*gb.*$//; s/-hbm.*$//; s/-sxm.*$//; s/-pcie.*$//')
NAME="$([ "$DRY" = 1 ] && echo dryrun-)${SLUG:-gpu}-$(date -u +%Y-%m-%d)"
RUN=$WORK/$NAME
mkdir -p "$RUN"
T0=$(date +%s)
export DRY RUN NAME RESULTS OUT WORK GPU
export RUNDIR=$REPO  # where Python starts; the install fallback moves it out of the checkout
# shellcheck source=benchmarks/acceptance/stages.sh
source "$ACC/stages.sh"

for stage in ${STAGES//,/ }; do
    if ! stage_known "$stage"; then echo "gpu_acceptance.sh: unknown stage '$stage'" >&2; exit 2; fi
done
summary_init
for stage in ${STAGES//,/ }; do
    run_stage "$stage"
    if [ "$stage" = env ]; then  # the install's outcome; a stage killed before it says: the shadow tree
        if [ -f "$RUN/env.sh" ]; then source "$RUN/env.sh"; else make_shadow
            export INSTALL_MODE=shadow PYTHONPATH=$WORK/shadow${PYTHONPATH:+:$PYTHONPATH} RUNDIR=$WORK; fi
    fi
done
if [ "${STATUS[copy]}" = ok ]; then  # the README and summary again, now that the copy's own row is final
    "$PYTHON" "$ACC/stage_report.py" readme "$RUN" && cp "$RUN/README.md" "$RUN/summary.md" "$RESULTS/$NAME/" &&
        cp "$RUN/README.md" "$OUT/README.md"
fi
publish
echo "gpu_acceptance.sh: done in $(( $(date +%s) - T0 )) s; summary: $OUT/summary.md"
