"""Would grouping the LoRA A-projections of layers that share an input help?

    flock /work/heavy.lock python benchmarks/lora_skinny.py --threads 2

q/k/v share their input x [T, 576] (three A matrices [8, 576]); gate/up share theirs (two).
Grouped, the forward is one x @ [A_q; A_k; A_v]^T ([576, 24]) instead of three [576, 8]
products, and the backward dA one [24, T] @ [T, 576] instead of three [8, T] @ [T, 576].
Prints the median microseconds of each, T = 2048 rows (4 x 512 tokens), fp32 and bf16,
and what the grouping would save per training step (30 layers: 3+2 A-projections each).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def clock(fn, a, b, n: int = 200) -> float:
    for _ in range(10):
        fn(a, b)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(a, b)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=2048)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t = args.rows
    print(f"T = {t}, threads {args.threads}; median microseconds\n")
    print("| dtype | op | 3 x r=8 | 1 x r=24 | 2 x r=8 | 1 x r=16 | saved per step (30 layers) |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(t, 576, dtype=dtype)
        fwd = [clock(torch.mm, x, torch.randn(576, r, dtype=dtype)) for r in (8, 24, 16)]
        bwd = [clock(torch.mm, torch.randn(r, t, dtype=dtype), x) for r in (8, 24, 16)]
        for name, (one, r24, r16) in (("forward x A^T", fwd), ("backward dA = g^T x", bwd)):
            saved = 30 * ((3 * one - r24) + (2 * one - r16)) / 1e3
            print(f"| {str(dtype).replace('torch.', '')} | {name} | {3 * one:.0f} | {r24:.0f} | {2 * one:.0f} | "
                  f"{r16:.0f} | {saved:.1f} ms |")


if __name__ == "__main__":
    main()
