"""Data-parallel scaling on CPU: tokens/s of 1 process vs 2 processes (torchrun, Gloo).

SmolLM2-135M, LoRA r=8 on all linear layers, builtin:tasks, micro-batch 4, the same global
batch of 8 examples per optimiser step in every run:

    1 process x 1 thread,  grad_accum=2      (what one rank of the 2-process job does, alone)
    1 process x 2 threads, grad_accum=2      (the fair baseline on a 2-core machine)
    2 processes x 1 thread, grad_accum=1     (torchrun --nproc_per_node 2, DDP)

The figure is the median ``tokens_per_s`` (input tokens of the global batch per second of
step time, as the loop logs it) over the steps after the first two. Run it under the shared
lock on a quiet machine:

    flock /work/heavy.lock python benchmarks/distributed_scaling.py [--steps 12] [--precision auto]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run(name: str, nproc: int, threads: int, accum: int, args, out_root: Path) -> dict:
    out = out_root / name
    overrides = [
        "model.name=smollm2-135m", "peft.method=lora", "peft.r=8", "data.path=builtin:tasks",
        "data.eval_split=8", "data.max_length=256", f"train.steps={args.steps}", "train.batch_size=4",
        f"train.grad_accum={accum}", "train.eval_every=0", "train.eval_batches=1", f"train.threads={threads}",
        f"train.mixed_precision={args.precision}", "train.progress=false", f"train.output_dir={out}",
        f"train.distributed={args.engine}",
    ]
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    if nproc == 1:
        cmd = [sys.executable, "-m", "peftlab", "train", *overrides]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--standalone", "--nproc_per_node", str(nproc), "-m", "peftlab", "train", *overrides]
    load_before = Path("/proc/loadavg").read_text().split()[0]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows[2:]]
    return {"run": name, "processes": nproc, "threads_per_process": threads, "grad_accum": accum,
            "median_tokens_per_s": round(statistics.median(tps), 1), "steps_timed": len(tps),
            "final_loss": rows[-1]["loss"], "wall_s": round(time.time() - t0, 1), "loadavg_before": load_before}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--precision", default="auto", help="train.mixed_precision (auto: bf16 where supported)")
    p.add_argument("--engine", default="ddp", choices=["ddp", "fsdp", "fsdp_grad_op"])
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of the three runs")
    args = p.parse_args()
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            results = [
                run("1proc-1thread", 1, 1, 2, args, Path(tmp)),
                run("1proc-2threads", 1, 2, 2, args, Path(tmp)),
                run(f"2proc-{args.engine}", 2, 1, 1, args, Path(tmp)),
            ]
        for r in results:
            print(json.dumps({"round": i + 1, **r}), flush=True)
        base = results[0]["median_tokens_per_s"]
        for r in results[1:]:
            print(f"round {i + 1}: {r['run']}: {r['median_tokens_per_s'] / base:.2f}x of 1proc-1thread", flush=True)


if __name__ == "__main__":
    main()
