# Sourced by benchmarks/gpu_acceptance.sh: the stage table, the orchestration (limits, status, the
# incremental summary, publishing to $OUT) and every stage's body. Bash only, so a broken Python still
# leaves a summary.
# shellcheck shell=bash

ALL_STAGES=(env correctness record sweep quality copy)
declare -A TITLE=([env]="environment" [correctness]="kernel correctness" [record]="the record"
    [sweep]="the sweep" [quality]="quality" [copy]="compact results")
# Hard limits in seconds (issue 24); quality also takes whatever the earlier stages left of the budget.
declare -A LIMIT=([env]=30 [correctness]=90 [record]=180 [sweep]=60 [quality]=120 [copy]=20)
declare -A DRY_LIMIT=([env]=90 [correctness]=120 [record]=150 [sweep]=20 [quality]=150 [copy]=30)
declare -A STATUS SECS LIM NOTE

stage_known() { [ -n "${TITLE[$1]:-}" ]; }
stage_index() { local i; for i in "${!ALL_STAGES[@]}"; do [ "${ALL_STAGES[$i]}" = "$1" ] && echo $((i + 1)); done; }
selected() { case ",$STAGES," in *",$1,"*) return 0 ;; esac; return 1; }
now_s() { date +%s; }
# Seconds left before $STAGE_DEADLINE minus a reserve, never below 1 (the bodies' inner timeouts).
left() { local l=$((STAGE_DEADLINE - $(now_s) - ${1:-0})); [ "$l" -lt 1 ] && l=1; echo "$l"; }
min() { [ "$1" -lt "$2" ] && echo "$1" || echo "$2"; }
# Seconds since a `date +%s%N` stamp, with milliseconds (no bc needed).
since() { local ms=$((($(date +%s%N) - $1) / 1000000)); printf '%d.%03d' $((ms / 1000)) $((ms % 1000)); }
dryflag() { [ "$DRY" = 1 ] && echo --dry-run; }

summary_init() {
    local s
    for s in "${ALL_STAGES[@]}"; do
        if selected "$s"; then STATUS[$s]=pending; else STATUS[$s]="not selected"; fi
    done
    STARTED=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
    COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
    summary_write
    publish
}

summary_write() {
    local s n tmp=$RUN/.summary.md.part
    {
        echo "# GPU acceptance: $NAME"
        echo
        echo "Machine: ${GPU:-no GPU (nvidia-smi found none)}; commit $COMMIT; started $STARTED;" \
            "budget $BUDGET s; dry run: $([ "$DRY" = 1 ] && echo "yes (CPU, shrunk stages: plumbing only, no GPU figures)" || echo no)."
        echo "Last update: +$(($(now_s) - T0)) s ($(date -u '+%H:%M:%S UTC'))."
        echo
        echo "| # | stage | status | seconds | limit (s) | note |"
        echo "|---|---|---|---|---|---|"
        for s in "${ALL_STAGES[@]}"; do
            echo "| $(stage_index "$s") | $s (${TITLE[$s]}) | ${STATUS[$s]} | ${SECS[$s]:-} | ${LIM[$s]:-} | ${NOTE[$s]:-} |"
        done
        for s in "${ALL_STAGES[@]}"; do
            n=$(stage_index "$s")
            if [ -s "$RUN/$s.md" ]; then echo; echo "## $n $s: ${TITLE[$s]}"; echo; cat "$RUN/$s.md"; fi
        done
    } >"$tmp" && mv -f "$tmp" "$RUN/summary.md"
}

# Copy the summary to $OUT and repack every stage file into $OUT/acceptance.tar.gz (each through a
# temporary name in $OUT and a rename, so $OUT never holds half a file under the final name).
publish() {
    cp "$RUN/summary.md" "$OUT/summary.md.part" && mv -f "$OUT/summary.md.part" "$OUT/summary.md"
    tar -czf "$OUT/acceptance.tar.gz.part" -C "$WORK" --exclude=shadow --exclude='*.part' "$NAME" 2>/dev/null &&
        mv -f "$OUT/acceptance.tar.gz.part" "$OUT/acceptance.tar.gz"
    rm -f "$OUT/acceptance.tar.gz.part"
}

# The limit of a stage: its own, capped by the budget left (minus the copy's seconds when it follows);
# quality takes all that is left.
stage_limit() {
    local s=$1 base reserve=0 left_s var
    base=$([ "$DRY" = 1 ] && echo "${DRY_LIMIT[$s]}" || echo "${LIMIT[$s]}")
    if [ "$s" != copy ] && selected copy; then reserve=$([ "$DRY" = 1 ] && echo "${DRY_LIMIT[copy]}" || echo "${LIMIT[copy]}"); fi
    left_s=$((T0 + BUDGET - $(now_s) - reserve))
    if [ "$s" = quality ]; then base=$left_s; fi
    var=ACCEPT_LIMIT_$s
    [ -n "${!var:-}" ] && base=${!var}
    min "$base" "$left_s"
}

run_stage() {
    local s=$1 limit t rc
    limit=$(stage_limit "$s")
    LIM[$s]=$limit
    if [ "$limit" -lt 3 ]; then
        STATUS[$s]=skipped NOTE[$s]="no time left in the $BUDGET s budget"
        summary_write && publish
        return
    fi
    STATUS[$s]="running (from +$(($(now_s) - T0)) s)"
    NOTE[$s]="if this is the last word, the call ended during this stage"
    summary_write && publish
    echo "== stage $(stage_index "$s") $s (limit $limit s)"
    t=$(now_s)
    STAGE_DEADLINE=$((t + limit)) timeout -k 5 "$limit" bash "$SELF" __body "$s" >"$RUN/$s.log" 2>&1
    rc=$?
    SECS[$s]=$(($(now_s) - t))
    NOTE[$s]=""
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        STATUS[$s]="**timed out**"
        NOTE[$s]="killed at $limit s; $([ -s "$RUN/$s.json" ] && echo "the partial $s.json is kept" || echo "no $s.json"); see $s.log"
    elif [ -f "$RUN/$s.skipped" ]; then
        STATUS[$s]=skipped NOTE[$s]=$(head -c 300 "$RUN/$s.skipped" | tr '\n|' '  ')
    elif [ "$rc" = 0 ]; then
        STATUS[$s]=ok NOTE[$s]=$([ -s "$RUN/$s.note" ] && head -c 300 "$RUN/$s.note" | tr '\n|' '  ')
    else
        STATUS[$s]="**failed** (exit $rc)" NOTE[$s]="last line: $(tail -n 1 "$RUN/$s.log" | head -c 200 | tr '|' ' ')"
    fi
    echo "   $s: ${STATUS[$s]} in ${SECS[$s]} s"
    summary_write && publish
}

stage_body() {
    local s=$1
    case ",${ACCEPT_FORCE_FAIL:-}," in *",$s,"*) echo "forced failure (ACCEPT_FORCE_FAIL=$s)"; return 1 ;; esac
    case ",${ACCEPT_FORCE_HANG:-}," in *",$s,"*) echo "forced hang (ACCEPT_FORCE_HANG=$s)"; sleep 100000; return 0 ;; esac
    cd "$RUNDIR" || return 1
    "body_$s"
}

# ---- 1 env ---------------------------------------------------------------------------------------
body_env() {
    local mode=editable rc args
    if command -v nvidia-smi >/dev/null; then
        timeout 10 nvidia-smi >"$RUN/nvidia-smi.txt" 2>&1
    else
        echo "nvidia-smi: not found" >"$RUN/nvidia-smi.txt"
    fi
    # Offline: no build isolation (nothing to fetch), no dependencies. A dry run asks pip for the metadata
    # only (--dry-run), the step that fails with a setuptools that cannot read the pyproject.
    args=(install --no-deps --no-build-isolation --no-input -e "$REPO")
    [ "$DRY" = 1 ] && args=(install --dry-run --no-deps --no-build-isolation --no-input -e "$REPO")
    (cd "$REPO" && timeout "$(min 20 "$(left 8)")" "$PYTHON" -m pip "${args[@]}") >"$RUN/install.log" 2>&1
    rc=$?
    # pip can succeed and still leave fastvae.kernels unmapped (an old editable finder): check the import
    if [ "$rc" = 0 ] && ! (cd "$RUNDIR" && timeout "$(left 5)" "$PYTHON" -c "import fastvae.kernels, fastvae.export") \
        >>"$RUN/install.log" 2>&1; then
        echo "pip succeeded but fastvae.kernels / fastvae.export do not import" >>"$RUN/install.log"
        rc=98
    fi
    if [ "$rc" != 0 ]; then
        mode=shadow
        make_shadow
        echo "pip exit $rc: importing fastvae from the shadow tree $WORK/shadow instead" >>"$RUN/install.log"
    fi
    {
        echo "export INSTALL_MODE=$mode INSTALL_RC=$rc"
        [ "$mode" = shadow ] && echo "export PYTHONPATH=$WORK/shadow\${PYTHONPATH:+:\$PYTHONPATH} RUNDIR=$WORK"
    } >"$RUN/env.sh"
    source "$RUN/env.sh"
    cd "$RUNDIR" && "$PYTHON" "$ACC/env_info.py" --run "$RUN" --gpu "${GPU:-}"
}

# The package-dir mapping of pyproject.toml (fastvae.kernels = kernels/, fastvae.export = export/) as a
# tree of links, for a Python that starts outside the checkout (./fastvae would shadow it otherwise).
make_shadow() {
    local sh=$WORK/shadow f
    rm -rf "$sh" && mkdir -p "$sh/fastvae"
    for f in "$REPO"/fastvae/*; do ln -s "$f" "$sh/fastvae/"; done
    ln -s "$REPO/kernels" "$sh/fastvae/kernels"
    ln -s "$REPO/export" "$sh/fastvae/export"
}

# ---- 2 correctness -------------------------------------------------------------------------------
body_correctness() {
    local respid pytest=("$PYTHON" -m pytest -p no:cacheprovider) res=() san
    local tests=("$REPO/tests/test_kernels.py" "$REPO/tests/test_kernels_extensions.py" "$REPO/tests/test_engine.py")
    [ "${INSTALL_MODE:-editable}" = shadow ] &&
        pytest+=(--import-mode=importlib --rootdir="$REPO" -c "$REPO/pyproject.toml")
    # The resource report compiles for sm_90 on the CPU: it runs beside the GPU work.
    res=(--preset pytorch-example --batch 128 --dtype fp32)
    # The headline cells, with each kernel's ESTIMATE (kernels/estimate.py) and a measured_us slot beside it.
    [ "$DRY" = 1 ] || res=(--cell pytorch-example:128:fp32 --cell pytorch-example:128:tf32
                           --cell pytorch-example:128:bf16 --cell pytorch-example:16384:bf16)
    (env -u TRITON_INTERPRET timeout "$(left 4)" "$PYTHON" -m fastvae.kernels.resources "${res[@]}" \
        --json "$RUN/resources.json" >"$RUN/resources.txt" 2>&1; echo $? >"$RUN/resources.rc") &
    respid=$!
    # Order of value: the GPU-marked tests, the TF32/bf16 measurement, memcheck, then the rest of the
    # kernel/engine tests (on a GPU they all run on CUDA) for the seconds left. -v: a killed run's log
    # still says which tests passed.
    timeout "$(min 30 "$(left 45)")" "${pytest[@]}" -m gpu -v -rs --junitxml="$RUN/pytest-gpu.xml" "${tests[@]}" \
        >"$RUN/pytest-gpu.log" 2>&1
    echo $? >"$RUN/pytest-gpu.rc"
    timeout "$(min 15 "$(left 30)")" "$PYTHON" "$ACC/tf32_error.py" --out "$RUN/tf32.json" $(dryflag) \
        >"$RUN/tf32.log" 2>&1
    echo $? >"$RUN/tf32.rc"
    san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n1)
    if [ -n "$san" ] && [ "$DRY" != 1 ]; then
        timeout "$(min 25 "$(left 20)")" "$san" --tool memcheck --error-exitcode 9 --target-processes all \
            "$PYTHON" "$ACC/small_step.py" >"$RUN/sanitizer-memcheck.log" 2>&1
        echo $? >"$RUN/sanitizer-memcheck.rc"
    else
        echo "skipped: $([ "$DRY" = 1 ] && echo "dry run" || echo "compute-sanitizer not found (PATH, /usr/local/cuda*/bin)")" \
            >"$RUN/sanitizer-memcheck.log"
    fi
    if [ "$DRY" = 1 ]; then
        echo "skipped: dry run (the interpreter would take minutes)" >"$RUN/pytest-rest.log"
    else
        timeout "$(left 4)" "${pytest[@]}" -m "not gpu" -v --junitxml="$RUN/pytest-rest.xml" "${tests[@]}" \
            >"$RUN/pytest-rest.log" 2>&1
        echo $? >"$RUN/pytest-rest.rc"
    fi
    wait "$respid"
    "$PYTHON" "$ACC/stage_report.py" correctness "$RUN"
}

# ---- 3 record ------------------------------------------------------------------------------------
body_record() {
    "$PYTHON" -m fastvae.bench.gpu --out "$RUN/record.json" --md "$RUN/record.md" \
        --budget "$(left 10)" $(dryflag)
}

# ---- 4 sweep -------------------------------------------------------------------------------------
body_sweep() {
    if ! timeout 30 "$PYTHON" -m fastvae sweep --help >/dev/null 2>&1; then
        echo "the sweep (issue 26) has not landed: no \`fastvae sweep\` command" | tee "$RUN/sweep.skipped"
        return 0
    fi
    # Issue 26 decides the command's flags; this call is the expected one and records what happens.
    "$PYTHON" -m fastvae sweep --json "$RUN/sweep.json" $(dryflag)
}

# ---- 5 quality -----------------------------------------------------------------------------------
body_quality() {
    local dev=cuda b t rc iw=5000 limit=() evl=() tl
    [ "$DRY" = 1 ] && dev=cpu iw=5 limit=(--max-steps 20) evl=(--limit 200)
    for b in triton torch; do
        if [ "$dev" = cpu ] && [ "$b" = triton ]; then
            echo "skipped: the fused backend needs CUDA (dry run)" >"$RUN/train-pe-$b.log"
            continue
        fi
        t=$(date +%s%N)
        timeout "$(min 100 "$(left 40)")" "$PYTHON" -m fastvae train --preset pytorch-example --epochs 10 \
            --backend "$b" --device "$dev" "${limit[@]}" --quiet --overwrite --out "$WORK/pe-$b" \
            >"$RUN/train-pe-$b.log" 2>&1
        rc=$?
        echo "{\"backend\": \"$b\", \"rc\": $rc, \"wall_s\": $(since "$t")}" >"$RUN/train-pe-$b.wall.json"
        [ -f "$WORK/pe-$b/metrics.jsonl" ] && cp "$WORK/pe-$b/metrics.jsonl" "$RUN/metrics-pe-$b.jsonl"
    done
    # iwae: train for the seconds left, keeping some for the IW NLL (k = 5000 over the 10,000 test images)
    tl=$(left "$([ "$DRY" = 1 ] && echo 40 || echo 45)")
    if [ "$tl" -gt 5 ]; then
        t=$(date +%s%N)
        timeout "$(left 30)" "$PYTHON" -m fastvae train --preset iwae --epochs 3280 --device "$dev" \
            --backend "$([ "$dev" = cuda ] && echo triton || echo torch)" --time-limit "$tl" "${limit[@]}" \
            --quiet --overwrite --out "$WORK/iwae" >"$RUN/train-iwae.log" 2>&1
        rc=$?
        echo "{\"rc\": $rc, \"time_limit_s\": $tl, \"wall_s\": $(since "$t")}" >"$RUN/train-iwae.wall.json"
        [ -f "$WORK/iwae/metrics.jsonl" ] && cp "$WORK/iwae/metrics.jsonl" "$RUN/metrics-iwae.jsonl"
        timeout "$(left 3)" "$PYTHON" -m fastvae eval "$WORK/iwae" --iw "$iw" "${evl[@]}" --json --device "$dev" \
            >"$RUN/eval-iwae.json" 2>"$RUN/eval-iwae.log"
        echo $? >"$RUN/eval-iwae.rc"
    else
        echo "skipped: $tl s left for the iwae run" >"$RUN/train-iwae.log"
    fi
    "$PYTHON" "$ACC/stage_report.py" quality "$RUN"
}

# ---- 6 copy --------------------------------------------------------------------------------------
body_copy() {
    local dest=$RESULTS/$NAME
    # README.md from the stage JSONs (a bash fallback when Python cannot run)
    "$PYTHON" "$ACC/stage_report.py" readme "$RUN" ||
        printf '# %s\n\nThe README generator failed (see copy.log); summary.md says what ran.\n' "$NAME" >"$RUN/README.md"
    cp "$RUN/README.md" "$OUT/README.md.part" && mv -f "$OUT/README.md.part" "$OUT/README.md"
    mkdir -p "$dest" && cp -r "$RUN"/. "$dest"/ && echo "copied to $dest" | tee "$RUN/copy.note"
}
