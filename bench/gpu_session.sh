#!/usr/bin/env bash
# The next GPU session's measurements, in order of value (bench/RESULTS.md lists why), as one prepared command.
#
# On the device (run tool), from the checkout's root, with .gpu/site carried (bitsandbytes, liger-kernel: see
# bench/RESULTS.md, "GPU measurements") and $OUT set by the tool:
#   run(command='OUT0=$OUT; OUT=/tmp/gs PACK_TO=$OUT0/session.tgz bash bench/gpu_session.sh', carry=[".gpu"],
#       timeout_s=590)
# Each part has its own timeout, and none runs past DEADLINE seconds from the start (570: the call's 590 less a
# margin), so a part that hangs or runs long costs the later ones only what is left; every part writes its JSON and
# log under $OUT as it goes (what finished comes back even if the call is cut off). PARTS picks parts, e.g.
# PARTS="rank2r liger" for a second, short call. SMOKE=1 runs every part on the CPU with its tiny shape (seconds):
# a check of this script before spending device time (tests/unit/test_bench_gpu.py runs it).
set -u
OUT=${OUT:-results/gpu_session}
mkdir -p "$OUT"
export PYTHONPATH=".:.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
# the next GPU session's parts by default; every part in smoke mode
if [ "$SMOKE" = 1 ]; then
    DEFAULT_PARTS="memory kernels kernels_off profile profile_step compile rank2r samwork liger cudatests"
else
    DEFAULT_PARTS="fused compile_fused cudatests profile_step compile8b kernels kernels_off"
fi
PARTS=${PARTS:-$DEFAULT_PARTS}
DEADLINE=${DEADLINE:-570}

part() {  # part NAME SECONDS COMMAND...: runs COMMAND under a timeout, its output in $OUT/NAME.log
    local name=$1 seconds=$2
    shift 2
    case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
    local started=$SECONDS left=$((DEADLINE - SECONDS))
    if [ "$left" -lt "$seconds" ]; then seconds=$left; fi
    if [ "$seconds" -lt 10 ]; then echo "== $name: skipped, ${left}s left before the deadline"; return 0; fi
    echo "== $name (limit ${seconds}s): $*"
    timeout -k 10 "$seconds" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - started))s"
    tail -n 25 "$OUT/$name.log"
    pack
}

pack() {  # PACK_TO=FILE: everything under $OUT as one archive, rewritten after each part (the device tool brings
    # back at most 8 files, and this script writes more; what finished is in the archive even if the call is cut off)
    if [ -n "${PACK_TO:-}" ]; then tar czf "$PACK_TO.part" -C "$OUT" . && mv "$PACK_TO.part" "$PACK_TO"; fi
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
# what the parts need from .gpu/site: a part whose package is missing records "skipped" rows, not an error
$PY -c "import importlib.util as u; print('carried:', *(f'{m}={bool(u.find_spec(m))}' for m in ('bitsandbytes', 'liger_kernel', 'flash_attn', 'pytest')))"

if [ "$SMOKE" = 1 ]; then
    part memory 300 $PY bench/bench_gpu_memory.py --tiny --methods hlora,ewc --targets qv --json "$OUT/bench_gpu_memory.json"
    part kernels 300 $PY bench/bench_gpu.py --tiny --no-levers --only hlora_record_vs,hlora_regularize_vs \
        --json "$OUT/bench_gpu_kernels.json"
    part kernels_off 300 env FORGETLESS_TRITON=0 $PY bench/bench_gpu.py --tiny --no-levers \
        --only hlora_record_vs,hlora_regularize_vs --json "$OUT/bench_gpu_kernels_off.json"
    part profile 300 $PY bench/profile_methods.py --tiny --methods hlora --out "$OUT/profile"
    part profile_step 300 $PY bench/profile_methods.py --tiny --methods plain --base bf16 --batch 4 --compile \
        --fused-lora --out "$OUT/profile"
    part compile 300 $PY bench/bench_gpu.py --tiny --no-levers --only hlora,step --json "$OUT/bench_gpu_compile.json"
    part rank2r 300 $PY bench/bench_method_state.py --rank-2r --reps 1 --inner 1
    part samwork 300 $PY bench/bench_method_state.py --sam --reps 1 --inner 1
    part liger 300 $PY bench/bench_gpu.py --tiny --levers --only liger,flash2 --json "$OUT/bench_gpu_levers.json"
    part cudatests 300 $PY -m pytest -q -p no:cacheprovider tests/unit/test_hlora.py tests/unit/test_on_accelerator.py \
        -k "timed_sections or forgetless_eval"
    exit 0
fi
# What session 31 (H100, bench/RESULTS.md "Measured on an H100, 2026-11-28") left for issue #15; #12's parts ran there.
# 1. the step / Trainer and MFU rows at 1B with the bf16 base, compile on both sides and fused_lora on forgetless's
#    (0.838 and 0.431 with compile alone in session 31; targets <= 0.80 and >= 0.45). Since session 32 compile also
#    compiles the chunked cross-entropy's chunks (the 1B rows' 8 x 1024 logits go chunked)
part compile_fused 220 $PY bench/bench_gpu.py --shapes 1b --no-levers --compile --fused-lora --trainer-compile \
    --only bf16base --json "$OUT/bench_gpu_compile_fused.json"
# 2. each of those levers alone against the same step without it at 1B, bf16 base: fused_lora (session 31) eager
#    and with both sides compiled, and the compiled cross-entropy chunks (session 32) with both sides compiled
part fused 200 $PY bench/bench_gpu.py --shapes 1b --levers --only fused_lora,compiled_ce \
    --json "$OUT/bench_gpu_fused.json"
# 3. the unit tests' cuda parameters (all passed in session 31 after one test's fix; the kernels changed after that:
#    NaN kept in the clamping modes, shapes checked, a failure kept per kernel)
part cudatests 100 $PY -m pytest -q -p no:cacheprovider -k cuda tests/unit/test_on_accelerator.py \
    tests/unit/test_kernels.py tests/unit/test_sam.py tests/unit/test_hlora.py tests/unit/test_ewc.py \
    tests/unit/test_lora_toolkit.py tests/unit/test_devices.py tests/unit/test_training.py
# 4. where the compiled bf16-base step's time goes: torch.profiler over 3 steps, kernels by kind, how busy the device
#    was (with fused_lora, as the step rows above)
part profile_step 120 $PY bench/profile_methods.py --shape 1b --methods plain --base bf16 --batch 16 --compile \
    --fused-lora --out "$OUT/profile"
# 5. the 8B bf16-base step and MFU rows, both sides compiled (never measured with compile; MFU >= 0.55 there): the
#    parts before leave it little of the 570 s; PARTS=compile8b gives it a call of its own
part compile8b 240 $PY bench/bench_gpu.py --shapes 8b --no-levers --compile --fused-lora --trainer-compile \
    --only bf16base --json "$OUT/bench_gpu_compile_8b.json"
# 6. what was measured before, each kept for a rerun after a change (PARTS=...): HLoRA's rows with and without the
#    kernels (1.023 / 1.031 in session 31), the 1B compiled step rows, EWC's memory at q/v, HLoRA's profile, Liger
part kernels 60 $PY bench/bench_gpu.py --shapes 1b --no-levers --only hlora_record_vs,hlora_regularize_vs \
    --json "$OUT/bench_gpu_kernels.json"
part kernels_off 60 env FORGETLESS_TRITON=0 $PY bench/bench_gpu.py --shapes 1b --no-levers \
    --only hlora_record_vs,hlora_regularize_vs --json "$OUT/bench_gpu_kernels_off.json"
part compile 260 $PY bench/bench_gpu.py --shapes 1b --no-levers --compile --trainer-compile --only bf16base \
    --json "$OUT/bench_gpu_compile.json"
part memory 150 $PY bench/bench_gpu_memory.py --methods ewc --targets qv --json "$OUT/bench_gpu_memory.json"
part profile 90 $PY bench/profile_methods.py --shape 1b --methods hlora --out "$OUT/profile"
part liger 60 $PY bench/bench_gpu.py --shapes 1b --only liger,flash2 --json "$OUT/bench_gpu_levers.json"
part rank2r 40 $PY bench/bench_method_state.py --rank-2r --device cuda --reps 5 --inner 2
part samwork 30 $PY bench/bench_method_state.py --sam --sam-shape 1b --device cuda --reps 9 --inner 3
