"""AdamW step time on CPU: for-loop vs foreach vs fused, LoRA-sized and full-model-sized.

    flock /work/heavy.lock python benchmarks/optimizer_step.py --threads 1

Parameters are shaped like SmolLM2-135M's (576 x 576 blocks); the best of 5 steps is reported
(an optimiser step is short, so the best is the cost without a neighbour's interference).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| parameters | for-loop ms | foreach ms | fused ms |\n|---|---|---|---|")
    for n_params, label in ((2_442_240, "LoRA r=8 all-linear (2.44 M)"), (134_515_008, "full (134.5 M)")):
        shapes = [(576, 576)] * (n_params // (576 * 576)) + [(n_params % (576 * 576),)]
        row = []
        for kw in ({"foreach": False}, {"foreach": True}, {"fused": True}):
            ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
            for p in ps:
                p.grad = torch.randn_like(p)
            opt = torch.optim.AdamW(ps, lr=1e-4, **kw)
            opt.step()
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                opt.step()
                ts.append(time.perf_counter() - t0)
            row.append(f"{min(ts) * 1e3:.1f}")
            del opt, ps
        print(f"| {label} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
