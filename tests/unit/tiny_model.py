"""A tiny random Llama built in-process, for unit tests (no downloads)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def make_tiny_model(seed: int = 0, vocab_size: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


def random_examples(n: int, length: int, vocab_size: int = 64, seed: int = 0, prompt: int = 0) -> list[dict]:
    """``n`` examples of ``length`` tokens; the first ``prompt`` tokens carry no loss."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab_size, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def make_lora_model(seed: int = 0, *, r: int = 4, alpha: float = 8, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                    dtype: torch.dtype = torch.float32, use_rslora: bool = False, b_std: float | None = None,
                    b_seed: int | None = None, dropout: float = 0.0):
    """``make_tiny_model(seed)`` with LoRA (no dropout unless ``dropout``) on ``targets``; ``b_std``: B drawn from
    N(0, b_std^2) instead of PEFT's zeros, so that the adapter changes the outputs (``b_seed`` defaults to
    ``seed + 1``)."""
    from forgetless.models import LoraSettings, attach_lora

    model = attach_lora(make_tiny_model(seed), LoraSettings(r=r, alpha=alpha, dropout=dropout,
                                                            target_modules=list(targets),
                                                            use_rslora=use_rslora)).to(dtype)
    if b_std is not None:
        randomize_lora_b(model, seed=seed + 1 if b_seed is None else b_seed, std=b_std)
    return model


def randomize_lora_b(model: torch.nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Every LoRA B (zero at initialization) drawn from N(0, std^2), in the parameters' order and dtype."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) * std)


def fused_and_plain(plugin, value, params: list[torch.Tensor]) -> list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
    """``[(value, d value / d params)]`` with the plugin's fused path, then with its plain per-module loop."""
    out = []
    for fused in (True, False):
        plugin.fused = fused
        v = value()
        out.append((v.detach(), torch.autograd.grad(v, params)))
    return out


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def launch_two_processes(script: str, out, port: int, timeout: int = 600) -> None:
    """Run ``tests/unit/<script> <out>`` under ``accelerate launch`` with 2 CPU processes (gloo); skip the test when
    the launcher is missing, fail it when the script fails or does not finish in ``timeout`` seconds (a hang is how a
    collective that one process skips shows: it was a skip, so such a bug passed), killing the processes it left.

    ``--cpu --num_processes 2`` starts ONE process in this accelerate version (its CPU launcher expects MPI);
    ``--multi_gpu`` goes through torchrun, and the script's ``Accelerator(cpu=True)`` then uses gloo on the CPU."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    root = Path(__file__).resolve().parents[2]
    launcher = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    if not Path(launcher).exists():
        pytest.skip("the accelerate CLI is not available")
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(port), str(root / "tests/unit" / script), str(out)]
    import signal

    launched = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root,
                                start_new_session=True)  # its own process group: the workers die with it
    try:
        _, stderr = launched.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(launched.pid, signal.SIGKILL)
        _kill_processes_of(str(out))  # torchrun starts each worker in a session of its own
        _, stderr = launched.communicate()
        pytest.fail(f"accelerate launch with 2 CPU processes did not finish in {timeout} s (a collective that one "
                    f"process never reached?):\n{stderr[-3000:]}")
    assert launched.returncode == 0, stderr[-3000:]


def _kill_processes_of(marker: str) -> None:
    """SIGKILL every process of this user whose command line has ``marker`` (a test's own folder)."""
    import os
    import signal
    from pathlib import Path

    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") \
                    and int(proc.name) != os.getpid():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue
