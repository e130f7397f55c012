#!/usr/bin/env bash
# The CUDA checks, and the GPU measurements still missing from docs/benchmarks.md, in ONE call
# of a lent GPU.
#
# A lent machine gives a session 15 minutes in all, its start included, and no machine starts
# with under 4 minutes left: plan on one call. (On 2026-12-04 the start took about 30 s and the
# call 7 minutes, and a second call made at once, while the machine was still warm, ran the
# steps that had run out of time: 5 minutes more.) So the steps run in
# order of importance, each under its own time limit (seconds, below), and whatever finished
# comes back even when a later step runs out of time. No step runs past BUDGET seconds from the
# start (575: a late step's limit is cut to what is left, and the archive is written before the
# call's own limit): run the call with timeout_s 600.
#
#   bash docs/gpu_session.sh                  # on the GPU machine, from the repository root
#   DRY=1 bash docs/gpu_session.sh            # here, on a CPU: the same steps, scaled down
#
# Writes two files to $OUT: session.log (every step's output, its exit status and seconds) and
# results.tgz (each step's JSON report). The device image has torch, transformers, pytest and
# hypothesis; PYTHONPATH imports this checkout, nothing is installed.
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
RES=$(mktemp -d)                      # JSON reports, packed into $OUT/results.tgz at the end
LOG=$OUT/session.log
: >"$LOG"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 APEX_MINI_CACHE=${APEX_MINI_CACHE:-/tmp/apex}
trap 'tar czf "$OUT/results.tgz" -C "$RES" . && echo "== wrote $OUT/results.tgz" | tee -a "$LOG";
      rm -rf "$RES"' EXIT

if [ "${DRY:-0}" = 1 ]; then          # a CPU check of the commands and flags, in minutes
    DEV=cpu BIG=tiny HALF=float32 SERVE_N=8 OVERFLOW_N=8 KERNELS=(--quick)
    OVERLAP_N=4 OVERLAP_LEN=64
else
    DEV=cuda BIG=llama2-7b HALF=float16 SERVE_N=16 OVERFLOW_N=32
    OVERLAP_N=16 OVERLAP_LEN=512
    KERNELS=(--contexts 1024,4096 --batches 1,8,32)
fi

# step NAME SECONDS COMMAND...: run COMMAND under a time limit, its output into the log.
# The limit is cut to what is left of BUDGET; a step with under 5 s left is skipped (exit 124).
# Returns COMMAND's exit status (124: out of time).
BUDGET=${BUDGET:-575}
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 5 ]; then
        echo "== $name: exit 124 after 0 s (skipped: ${left} s of the budget left)" | tee -a "$LOG"
        return 124
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit} s, $(date -u +%H:%M:%S) UTC)" | tee -a "$LOG"
    local start=$SECONDS
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$LOG"
    return "$status"
}

# 1. The machine and the software versions (the image's torch may differ from the pin).
step machine 20 bash -c 'nvidia-smi -L; python3 -c "import torch, transformers, sys;
print(sys.version.split()[0], \"torch\", torch.__version__, \"transformers\", transformers.__version__,
\"cuda\", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else \"\")"'

# 2. The CUDA tests: tokens equal the CPU's under every policy, with and without graphs; graph
#    replays equal eager logits; CPU attention overlaps device kernels; the pinned pool; the
#    reserve against an iteration's peak. (2026-12-04, H200: 20 passed, 1 skipped, 37 s.)
step pytest-gpu 75 python3 -m pytest -q -p no:cacheprovider -m gpu tests -rs

# 3. The fast-decode goal, 70% of the roofline for Llama-2-7B fp16 at batch 1 (48% on
#    2026-12-04 with the eager step in the graph): the compiled step, then the default, minutes
#    apart on the same machine. transformers ran then (3.47x); not again here.
DECODE=(python3 -m apex_mini.bench decode --model-shape "$BIG" --dtype "$HALF" --device "$DEV"
        --batches 1 --repeats 3 --no-hf)
step decode-compiled 150 "${DECODE[@]}" --compile-decode --json "$RES/decode_${DEV}_${BIG}_compiled.json"
step decode-eager 60 "${DECODE[@]}" --json "$RES/decode_${DEV}_${BIG}_eager.json"

# 4. The predictor's error on this machine, now with graph captures counted apart (87% p90 on
#    2026-12-04, most of it captures). Its profile is cached (APEX_MINI_CACHE) for step 5's
#    engines, which would otherwise profile inside that step's limit (about 140 s for both).
step profile-report 150 python3 -m apex_mini.profile --report --model-shape "$BIG" \
    --dtype "$HALF" --device "$DEV" --gpu-memory-gb 16 --quick --no-progress \
    --json "$RES/profile_report_$DEV.json" --out "$RES/profile_$DEV.json"

# 5. Serving on a T4-sized budget with the workload's own warm-up (on 2026-12-04 the first
#    policy's first prefill took 15x the others'), two rounds in turns.
step serve 110 python3 -m apex_mini.bench serve --model-shape "$BIG" --dtype "$HALF" \
    --device "$DEV" --gpu-memory-gb 16 --workload chat --num-requests "$SERVE_N" \
    --length-scale 0.25 --policies gpu-only,neo,apex --repeats 2 --no-progress \
    --json "$RES/serve_${DEV}_${BIG}_t4.json"

# 6. The same budget on a workload whose KV is about twice the device pool (every request fit
#    on 2026-12-04, so no policy had a reason to use the host): one round.
step serve-overflow 150 python3 -m apex_mini.bench serve --model-shape "$BIG" --dtype "$HALF" \
    --device "$DEV" --gpu-memory-gb 16 --workload chat --num-requests "$OVERFLOW_N" \
    --length-scale 0.5 --policies gpu-only,neo,apex --no-progress \
    --json "$RES/serve_${DEV}_${BIG}_t4_overflow.json"

# 7. Measured on 2026-12-04 (docs/benchmarks.md); again if time is left. The overlap evidence:
#    per layer, when the CPU worker attended and when the GPU ran the device attention's
#    kernels, with the compiled host kernel (the eager one's if that run fails). Then the host
#    kernel on this machine's cores.
OVERLAP=(python3 -m apex_mini.bench overlap --model-shape "$BIG" --dtype "$HALF" --device "$DEV"
         --num-requests "$OVERLAP_N" --prompt-len "$OVERLAP_LEN" --steps 3)
step overlap 95 env APEX_MINI_EAGER_CPU_ATTENTION=0 "${OVERLAP[@]}" \
    --json "$RES/overlap_${DEV}_$BIG.json" ||
    step overlap-eager 45 env APEX_MINI_EAGER_CPU_ATTENTION=1 "${OVERLAP[@]}" \
        --json "$RES/overlap_${DEV}_${BIG}_eager.json"
step kernels 70 python3 -m apex_mini.bench kernels "${KERNELS[@]}" --json "$RES/kernels_host.json"

grep '^== .*exit' "$LOG"                        # the summary, last in the reply
