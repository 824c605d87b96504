"""bench/bench_gpu.py --tiny: the GPU benchmark's code path runs on the CPU and writes every row of issue #15's table.

A smoke test of the code, not of speed: it checks that each row is there and is a finite positive number.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROWS = ["step_vs_trainer_fp32base", "mfu_fp32base", "step_vs_trainer_bf16base", "mfu_bf16base",
        "hlora_record_vs_plain", "hlora_regularize_vs_plain", "hlora_record_offload_vs_plain",
        "hlora_regularize_offload_vs_plain", "sam_vs_plain", "sam_every4_vs_plain", "ewc_fisher",
        "ewc_fisher_run_precision"]


def _numbers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


def test_bench_gpu_tiny_writes_every_row(tmp_path):
    out = tmp_path / "bench_gpu.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--tiny", "--rounds", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=1200, cwd=tmp_path, env=env)  # a hang guard only
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["env"]["smoke_test_only"] is True
    assert report["env"]["bf16_matmul_flops"] > 0
    rows = report["rows"]
    assert sorted(rows) == sorted(f"{name}@tiny" for name in ROWS)
    for name, row in rows.items():
        assert "error" not in row, (name, row)
        numbers = list(_numbers({k: v for k, v in row.items() if k != "target"}))
        assert numbers, name
        for number in numbers:
            assert math.isfinite(number) and number > 0, (name, row)
    assert rows["step_vs_trainer_fp32base@tiny"]["trainer_s"] > 0
    assert rows["ewc_fisher@tiny"]["tokens"] == 8 * 31  # 8 examples of 32 tokens: 31 predicted each
    assert rows["ewc_fisher_run_precision@tiny"]["tokens"] == 8 * 31
    assert rows["ewc_fisher@tiny"]["fisher_precision"] == "float32"


def test_bench_gpu_memory_tiny_writes_every_row(tmp_path):
    """bench/bench_gpu_memory.py --tiny (issue #12 items 8-9's script): every row runs on the CPU, among them HLoRA and
    EWC with storage_dtype bfloat16 and offload cpu, and the 4-bit base where bitsandbytes is installed."""
    import importlib.util

    out = tmp_path / "memory.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu_memory.py"), "--tiny", "--steps", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=1200, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    expected = {"bf16_nockpt", "bf16_ckpt", "nf4_ckpt"}
    for targets in ("qv", "all"):
        expected |= {f"lora-nu-mu_{targets}_{stage}" for stage in ("general", "domain")}
        expected |= {f"{method}_{targets}{variant}_{stage}" for method in ("hlora", "ewc")
                     for variant in ("", "_bf16", "_offload") for stage in ("general", "domain")}
    assert sorted(rows) == sorted(f"{name}@tiny" for name in expected)
    for name, row in rows.items():
        if name == "nf4_ckpt@tiny" and importlib.util.find_spec("bitsandbytes") is None:
            assert "bitsandbytes" in row["skipped"]
            continue
        assert "error" not in row and math.isfinite(row["value"]) and row["value"] > 0, (name, row)
        if name.startswith(("hlora", "ewc")):
            assert math.isfinite(row["extra_gib"]), (name, row)
    assert rows["hlora_qv_offload_domain@tiny"]["options"] == {"offload": "cpu"}


# The smoke parts whose commands no other test runs (profile_methods.py, bench_method_state.py, the cudatests pytest
# call) and one bench_gpu.py part for the JSON flow; memory, kernels_off, compile and liger run bench_gpu.py and
# bench_gpu_memory.py --tiny subsets that the two tests above cover whole (about 80 s less of a CI run; SMOKE=1
# alone still runs them all).
SMOKE_PARTS = ("kernels", "profile", "profile_step", "rank2r", "samwork", "cudatests")


def test_the_prepared_gpu_session_runs_every_part_in_smoke_mode(tmp_path):
    """bench/gpu_session.sh, the next GPU session's one command, with SMOKE=1: its parts (:data:`SMOKE_PARTS`) run on
    the CPU with their tiny shapes and exit 0, and the files the session is for are written under $OUT."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), SMOKE="1", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PARTS=" ".join(SMOKE_PARTS), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh")], capture_output=True, text=True,
                          timeout=1200, cwd=ROOT, env=env)  # a hang guard only
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in SMOKE_PARTS:
        assert f"== {name}: exit 0 " in proc.stdout, proc.stdout[-3000:]
    assert json.loads((tmp_path / "out" / "bench_gpu_kernels.json").read_text())["rows"]
    assert "path_integral" in (tmp_path / "out" / "rank2r.log").read_text()
    assert "new (grouped _foreach)" in (tmp_path / "out" / "samwork.log").read_text()
    for stage in ("general", "domain"):  # the profile marks HLoRA's hooks as regions
        table = (tmp_path / "out" / "profile" / f"hlora_{stage}_tiny.txt").read_text()
        assert ("hlora.after_optimizer_step" if stage == "general" else "hlora.extra_loss") in table
    step = (tmp_path / "out" / "profile" / "plain_general_tiny.txt").read_text()  # the plain step, compiled
    assert "batch 4 x 32, {'compile': True, 'fused_lora': True}" in step and "whole step (host)" in step
    assert "2 passed" in (tmp_path / "out" / "cudatests.log").read_text()  # test_on_accelerator's and a timer test


def test_the_gpu_session_gives_no_part_more_than_the_time_left(tmp_path):
    """Every part's limit is cut to what is left before DEADLINE (the device call's own limit, less a margin), so the
    script ends by then: the first part gets at most the 25 s left, not its own 300; the second at most what the
    first left (by the script's own printed times, not a clock of this test's); a part with under 10 s left is
    skipped."""
    import re

    env = dict(os.environ, OUT=str(tmp_path / "out"), SMOKE="1", DEADLINE="25", PYTHON=sys.executable,
               OMP_NUM_THREADS="1", PARTS="memory compile",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh")], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("== ")]
    first = next(line for line in lines if line.startswith(("== memory (", "== memory: skipped")))
    if first.startswith("== memory: skipped"):  # the version checks before it took 15 s or more (a loaded machine)
        assert int(re.search(r"skipped, (-?\d+)s left", first).group(1)) < 10, lines
        assert not any(line.startswith("== compile (") for line in lines), lines  # less is left for the second
        return
    assert int(re.search(r"limit (\d+)s", first).group(1)) <= 25, lines
    took = int(re.search(r"== memory: exit \d+ after (\d+)s", proc.stdout).group(1))
    second = next(line for line in lines if line.startswith(("== compile (", "== compile: skipped")))
    if second.startswith("== compile ("):
        assert int(re.search(r"limit (\d+)s", second).group(1)) <= 25 - took + 1, lines  # +1: whole seconds
    else:
        left = int(re.search(r"skipped, (-?\d+)s left", second).group(1))
        assert left < 10 and left <= 25 - took + 1, lines


def test_the_profile_sorts_kernels_by_kind_from_their_names():
    """profile_methods.kind: names of the kernels seen in session 31's H100 profile and of common matmul and
    attention kernels go to their kind; element-wise and copy kernels to ``other``."""
    sys.path.insert(0, str(ROOT / "bench"))
    from profile_methods import kind

    assert kind("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert kind("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_32x5_tn") == "matmul"
    assert kind("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3") == "attention"  # not matmul
    assert kind("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>") == "attention"
    assert kind("fmha_cutlassF_bf16_aligned_64x64_rf_sm80") == "attention"  # memory-efficient sdpa, a CUTLASS kernel
    assert kind("void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda>") == "other"
    assert kind("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "other"


def test_a_trainer_round_leaves_the_model_as_the_forgetless_round_needs_it():
    """A Trainer round with bf16 left accelerate's mixed-precision wrapper on the shared model's forward, so every
    later forgetless round took the Trainer's full-logits loss path (and its peak memory): rounds after the first
    measured the Trainer's loss, not forgetless's."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_gpu

    from forgetless.training.loss import CausalLMLoss
    from tests.unit.tiny_model import make_lora_model

    model = make_lora_model(0)
    assert CausalLMLoss(model)._scorer.fast
    plan = bench_gpu.PLANS["tiny"]
    bench_gpu.trainer_run(model, plan, batch=2, seq=8, precision="bf16")
    assert "forward" not in model.__dict__ and "_original_forward" not in model.__dict__
    assert CausalLMLoss(model)._scorer.fast  # the labelled-rows loss path again
