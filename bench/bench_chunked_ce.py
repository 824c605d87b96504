"""The head + cross-entropy of the labelled rows, plain against chunked (forgetless.training.loss), on the CPU:
peak memory and time of one forward and backward, each side in its own fresh process, alternated.

Shape: ``--rows`` hidden states (4 x 1024 labelled tokens by default, as the 8B rows of bench_gpu_memory.py) of
``--hidden`` features, a frozen head onto ``--vocab`` (128256: Llama-3's), float32 (``--bf16``: under bf16 autocast).
Memory: the growth of the process's max RSS over the call (the inputs are allocated and touched before), so it is
what the loss and its backward add; time: the call's wall time. Each side runs ``--rounds`` times, in fresh processes,
alternating, and the best of each is kept. Prints the ratios chunked / plain.

``--compiled``: the chunks eager against the chunks through torch.compile (``compile: true``), each process
running ``--warm`` (default 2) untimed calls first (the compilations: full chunks, then the shorter last one); the
memory growth is then what the timed call adds beyond the warm-up's peak, near 0, so only the time means anything.

Usage: python bench/bench_chunked_ce.py [--rows 4096] [--hidden 1024] [--vocab 128256] [--rounds 2] [--bf16]
       [--compiled [--warm 2]]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def one(side: str, rows: int, hidden_size: int, vocab: int, bf16: bool, warm: int = 0) -> dict:
    import torch
    import torch.nn.functional as F

    from forgetless.training.loss import CHUNK_ELEMENTS, ChunkedLinearCrossEntropy

    torch.manual_seed(0)
    weight = torch.randn(vocab, hidden_size) * hidden_size ** -0.5
    hidden = torch.randn(rows, hidden_size, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))

    def call() -> torch.Tensor:
        hidden.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if side == "plain":
                loss = F.cross_entropy(F.linear(hidden, weight).float(), targets)
            else:
                loss = ChunkedLinearCrossEntropy.apply(hidden, weight, None, targets, None,
                                                       max(1, CHUNK_ELEMENTS // vocab), side == "compiled")
        loss.backward()
        return loss

    for _ in range(warm):
        call()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    loss = call()
    seconds = time.perf_counter() - t0
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20  # KiB -> GiB
    return {"side": side, "seconds": seconds, "peak_growth_gib": grown, "loss": loss.item(),
            "grad_sum": float(hidden.grad.double().abs().sum())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compiled", action="store_true", help="eager chunks against compiled chunks")
    parser.add_argument("--warm", type=int, default=None, help="untimed calls first (default: 2 with --compiled)")
    parser.add_argument("--side", choices=("plain", "chunked", "compiled"), help=argparse.SUPPRESS)  # a child
    args = parser.parse_args(argv)
    warm = args.warm if args.warm is not None else (2 if args.compiled else 0)
    if args.side:
        print(json.dumps(one(args.side, args.rows, args.hidden, args.vocab, args.bf16, warm)))
        return 0
    root = Path(__file__).resolve().parents[1]
    best: dict[str, dict] = {}
    pair = ("chunked", "compiled") if args.compiled else ("plain", "chunked")
    for r in range(args.rounds):
        for side in (pair if r % 2 == 0 else pair[::-1]):
            cmd = [sys.executable, __file__, "--side", side, "--rows", str(args.rows), "--hidden", str(args.hidden),
                   "--vocab", str(args.vocab), "--warm", str(warm)] + (["--bf16"] if args.bf16 else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=root).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(f"  {side:8s} {row['seconds']:7.3f} s  peak growth {row['peak_growth_gib']:6.3f} GiB  "
                  f"loss {row['loss']:.6f}  |grad| {row['grad_sum']:.6f}", flush=True)
            keep = best.get(side)
            best[side] = {"seconds": min(row["seconds"], keep["seconds"]) if keep else row["seconds"],
                          "peak_growth_gib": min(row["peak_growth_gib"], keep["peak_growth_gib"]) if keep
                          else row["peak_growth_gib"], "loss": row["loss"], "grad_sum": row["grad_sum"]}
    plain, chunked = best[pair[0]], best[pair[1]]
    print(f"rows {args.rows} x vocab {args.vocab} (hidden {args.hidden}, {'bf16 autocast' if args.bf16 else 'fp32'}): "
          f"{pair[1]} / {pair[0]} time {chunked['seconds'] / plain['seconds']:.3f}, peak growth "
          f"{chunked['peak_growth_gib']:.3f} / {plain['peak_growth_gib']:.3f} GiB = "
          f"{chunked['peak_growth_gib'] / max(plain['peak_growth_gib'], 1e-9):.3f}; loss rel diff "
          f"{abs(chunked['loss'] - plain['loss']) / abs(plain['loss']):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
