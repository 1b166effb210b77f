"""The LoRA family side by side on the real offline base model: same data, same steps.

    flock /work/heavy.lock python benchmarks/lora_family.py [--steps 40] [--out runs/lora_family]

Every method trains ``smollm2-135m`` on ``builtin:tasks`` (the same 64 held-out examples for
eval, the same seed, order and batches) for the same number of optimiser steps, each in its own
process, one after another. Reported: trainable parameters, final eval loss, wall time of the whole
``peftlab train`` process (load, train, eval, save) and its peak resident memory. The commands
are printed, and the results are written to ``<out>/results.json`` and ``<out>/results.md``.

Learning rates follow each method's paper/PEFT practice (LoRA-family 1e-3 here; VeRA trains only
scaling vectors and uses 10x that, as its paper does). AdaLoRA runs twice: at LoRA's 1e-3 and at
1e-2, because its E starts at zero with A, B ~ N(0, 0.02) and barely moves in 40 steps at 1e-3.
Everything else is identical.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
COMMON = ["model.name=smollm2-135m", "data.path=builtin:tasks", "data.eval_split=64", "data.max_length=256",
          "train.batch_size=8", "train.warmup=4", "train.eval_every=0", "train.save_every=0",
          "train.progress=false", "train.overwrite=true", "train.seed=0"]
LORA = ["peft.r=8", "peft.alpha=16", "peft.targets=all-linear", "train.lr=1e-3"]
ADALORA = ["peft.method=adalora", "peft.init_r=12", "peft.target_r=8", "peft.targets=all-linear", "peft.tinit=4",
           "peft.tfinal=8", "peft.delta_t=2"]
METHODS = {
    "LoRA": ["peft.method=lora", *LORA],
    "rsLoRA": ["peft.method=lora", *LORA, "peft.use_rslora=true"],
    "DoRA": ["peft.method=dora", *LORA],
    "PiSSA": ["peft.method=lora", *LORA, "peft.init=pissa", "peft.pissa_niter=4"],
    "VeRA": ["peft.method=vera", "peft.r=256", "peft.targets=all-linear", "train.lr=1e-2"],
    "AdaLoRA": [*ADALORA, "train.lr=1e-3"],
    "AdaLoRA (lr 1e-2)": [*ADALORA, "train.lr=1e-2"],
    "LoRA-FA": ["peft.method=lora", *LORA, "peft.freeze_a=true"],
    "QLoRA (nf4)": ["peft.method=lora", *LORA, "model.quantize=nf4"],
}
WRAPPER = ("import resource, sys; from peftlab.cli import main; code = main(sys.argv[1:]); "
           "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); "
           "sys.exit(code)")


def run(name: str, overrides: list[str], out: Path, steps: int) -> dict:
    run_dir = out / "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    args = ["train", *COMMON, f"train.steps={steps}", *overrides, f"train.output_dir={run_dir}"]
    print("$ peftlab " + " ".join(shlex.quote(a) for a in args), flush=True)
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    peak = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    extra = [line for line in proc.stderr.splitlines() if line.startswith(("adalora:", "  model."))]
    return {"method": name, "trainable": summary["trainable"], "eval_loss": round(summary["eval_loss"], 4),
            "train_wall_s": summary["wall_time_s"], "process_wall_s": round(wall, 1),
            "peak_rss_mb": round(peak / 1024), "command": "peftlab " + " ".join(args), "notes": extra}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default="runs/lora_family")
    p.add_argument("--only", nargs="*", help="a subset of the methods, by name")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, overrides in METHODS.items():
        if args.only and name not in args.only:
            continue
        rows.append(run(name, overrides, out, args.steps))
        r = rows[-1]
        print(f"  {name}: eval loss {r['eval_loss']}, {r['train_wall_s']} s, {r['trainable']:,} trainable, "
              f"peak RSS {r['peak_rss_mb']} MB", flush=True)
    lines = ["| method | trainable params | eval loss | wall time (s) | peak RSS (MB) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['trainable']:,} | {r['eval_loss']:.4f} | {r['train_wall_s']:.0f} | "
              f"{r['peak_rss_mb']} |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
