"""AdapterFusion on two closed tasks: does fusing two task adapters score at least as well on the union of
their held-out sets as either adapter alone?

    env PYTHONPATH=src python benchmarks/adapter_fusion_demo.py --steps 40 --fusion-steps 30 \
        --out benchmarks/results/adapter_fusion_demo.json

Stage one trains a bottleneck adapter (``peft.method=adapter``, serial, b = 64) on ``builtin:codes`` and
another on ``builtin:zh-numbers`` (SmolLM2-135M-Instruct, the same steps, lr, batch and seed). Stage two
trains ``peft.method=adapter_fusion peft.adapters=[codes run, zh run]`` on the union of the two tasks'
training records. Each model is scored by held-out exact match (greedy, the recipe suite's generation
settings) on both held-out sets (90 + 90 examples) and their union. Everything runs in this process,
float32, one after the other.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TASKS = {"codes": 8, "zh-numbers": 24}  # task -> max_new_tokens (as in benchmarks/recipes.py)


def common(seed: int, steps: int, lr: float, out: Path) -> list[str]:
    return ["model.name=smollm2-135m", f"train.steps={steps}", "train.batch_size=8", f"train.lr={lr}",
            f"train.seed={seed}", "train.eval_every=0", "train.progress=false", "train.mixed_precision=no",
            "train.overwrite=true", f"train.output_dir={out}"]


def union_file(work: Path) -> Path:
    """The two tasks' training records as one messages JSONL file."""
    from peftlab.data.closed_tasks import closed_task_conversations

    path = work / "union.jsonl"
    with path.open("w") as f:
        for task in TASKS:
            for conv in closed_task_conversations(task):
                f.write(json.dumps({"messages": conv.messages}, ensure_ascii=False) + "\n")
    return path


def exact_match_on(model, tok, task: str, seed: int) -> tuple[int, int]:
    """(hits, examples) of greedy generation on ``builtin:TASK/heldout``."""
    from peftlab.configure import load_config
    from peftlab.data.dataset import build_datasets
    from peftlab.eval.generate import generate
    from peftlab.eval.metrics import exact_match

    cfg = load_config(None, ["model.name=smollm2-135m", f"data.path=builtin:{task}",
                             f"data.eval_path=builtin:{task}/heldout"])
    data = build_datasets(cfg.data, tok, seed)
    records = data.eval_records
    model.eval()
    preds = generate(model, tok, data.encoder, [r.messages[:-1] for r in records],
                     max_new_tokens=TASKS[task], batch_size=16)
    refs = [r.messages[-1]["content"] for r in records]
    return sum(exact_match(p, r) for p, r in zip(preds, refs)), len(refs)


def score(model, tok, seed: int) -> dict:
    out, hits, total = {}, 0, 0
    for task in TASKS:
        h, n = exact_match_on(model, tok, task, seed)
        out[task] = round(h / n, 4)
        hits, total = hits + h, total + n
    out["union"] = round(hits / total, 4)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--fusion-steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fusion-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--work", default="/tmp/peftlab-bench/adapter_fusion")
    p.add_argument("--out", default="benchmarks/results/adapter_fusion_demo.json")
    args = p.parse_args()

    import torch

    from peftlab.configure import load_config
    from peftlab.train.loop import train

    torch.set_num_threads(2)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows, started = [], time.time()
    runs = {}
    for task in TASKS:
        out = work / task
        cfg = load_config(None, [*common(args.seed, args.steps, args.lr, out), f"data.path=builtin:{task}",
                                 f"data.eval_path=builtin:{task}/heldout", "peft.method=adapter",
                                 "peft.bottleneck=64"])
        t0 = time.time()
        result = train(cfg)
        runs[task] = str(result.run_dir)
        summary = json.loads((result.run_dir / "summary.json").read_text())
        rows.append({"model": f"adapter on {task}", "trainable": summary["trainable"],
                     "train_s": round(time.time() - t0, 1), **score(result.model, result.tokenizer, args.seed)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    cfg = load_config(None, [*common(args.seed, args.fusion_steps, args.fusion_lr, work / "fusion"),
                             f"data.path={union_file(work)}", "data.format=messages", "data.eval_split=16",
                             "peft.method=adapter_fusion", f"peft.adapters=[{runs['codes']},{runs['zh-numbers']}]"])
    t0 = time.time()
    result = train(cfg)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    rows.append({"model": "adapter_fusion of both", "trainable": summary["trainable"], "train_s": round(time.time() - t0, 1),
                 **score(result.model, result.tokenizer, args.seed)})
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    command = "env PYTHONPATH=src python benchmarks/adapter_fusion_demo.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "seed": args.seed, "steps": args.steps,
                               "fusion_steps": args.fusion_steps, "lr": args.lr, "fusion_lr": args.fusion_lr,
                               "rows": rows, "total_wall_s": round(time.time() - started, 1)}, indent=2))
    print("| model | codes | zh-numbers | union |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['codes']:.1%} | {r['zh-numbers']:.1%} | {r['union']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
