"""LongLoRA on a tiny Llama: train at 4x the original context with S²-Attn, read it with full attention.

    python benchmarks/longlora_context.py [--steps0 300] [--steps 100] [--seeds 1]

1. "Original" model: a tiny Llama (hidden 128, 4 layers, SmolLM2's tokenizer) with a context of 128
   tokens, pre-trained in full on 128-token blocks of ../shared/data/wiki_demo.txt.
2. Extended to 512 tokens (4x) three ways, same steps, batch, lr and seed, on 512-token blocks:
     longlora      peft.method=longlora, S²-Attn groups of 1/4, position interpolation x4,
                   LoRA r=8 on q,k,v,o + trainable embeddings and norms
     full-attn     the same trainable parameters and interpolation, full attention in training
                   (peft.group_ratio=1: one group, the model's own attention)
     none          no training (position interpolation only)
3. Perplexity at 512 tokens, full attention, on held-out wiki blocks (the run's eval split).
4. Step time and peak RSS of S²-Attn vs full attention at longer lengths (one process each).

Writes benchmarks/results/longlora_context.json; every run is a `peftlab train` subprocess.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT, worker_env  # noqa: E402

WIKI = ROOT.parent / "shared" / "data" / "wiki_demo.txt"
TINY = {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 256, "max_position_embeddings": 128,
        "vocab": 49152, "tie_word_embeddings": True}


def train(out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "peftlab", "train", "train.progress=false", "train.mixed_precision=no",
           "train.threads=2", "train.overwrite=true", f"train.output_dir={out}", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, env=worker_env())
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\n{r.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps0", type=int, default=300)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lengths", default="512,2048", help="lengths for the step time / memory comparison")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "longlora_context.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="peftlab-longlora-"))
    data = ["data.path=" + str(WIKI), "data.format=text", "data.eval_split=0.05", "train.eval_every=0"]
    model = ["model.name=config:llama", "model.tokenizer=smollm2-135m",
             *[f"model.config_overrides.{k}={v}" for k, v in TINY.items()]]
    results: dict = {"tiny": TINY, "seed": args.seed}
    base = train(work / "base", [*model, *data, "peft.method=full", "data.max_length=128", "train.batch_size=8",
                                 f"train.steps={args.steps0}", "train.lr=1e-3", f"train.seed={args.seed}"])
    results["original_128"] = {"eval_loss": base["eval_loss"], "ppl": math.exp(base["eval_loss"])}
    base_dir = str(work / "base" / "model")
    long = [f"model.name={base_dir}", *data, "data.max_length=512", "train.batch_size=4", "train.lr=5e-4",
            f"train.seed={args.seed}"]
    variants = {"longlora": ["peft.method=longlora", "peft.context_factor=4", "peft.group_ratio=0.25"],
                "full-attn": ["peft.method=longlora", "peft.context_factor=4", "peft.group_ratio=1"]}
    for name, extra in variants.items():
        s = train(work / name, [*long, *extra, f"train.steps={args.steps}"])
        results[name] = {"eval_loss_512": s["eval_loss"], "ppl_512": math.exp(s["eval_loss"]),
                         "train_s": s["wall_time_s"], "peak_rss_mb": s.get("peak_rss_mb")}
        print(name, results[name], flush=True)
    # (plain RoPE extrapolation past 128 positions is refused by the data validator: the context is 128)
    for name, extra in {"none, interpolation x4": ["peft.method=longlora", "peft.context_factor=4"]}.items():
        s = train(work / name.replace(" ", "").replace(",", "-"), [*long, *extra, "train.steps=1", "train.lr=1e-12"])
        results[name] = {"eval_loss_512": s["eval_loss"], "ppl_512": math.exp(s["eval_loss"])}
        print(name, results[name], flush=True)
    timing = {}
    for n in [int(x) for x in args.lengths.split(",")]:
        for name, ratio in (("s2attn", "0.25"), ("full", "1")):
            s = train(work / f"t{n}{name}", [f"model.name={base_dir}", *data, f"data.max_length={n}",
                                            "train.batch_size=1", "train.steps=6", "peft.method=longlora",
                                            f"peft.context_factor={max(1, n // 128)}", f"peft.group_ratio={ratio}"])
            steps = [json.loads(x) for x in (work / f"t{n}{name}" / "metrics.jsonl").read_text().splitlines()]
            times = sorted(r["input_tokens"] / r["tokens_per_s"] for r in steps[1:] if r.get("tokens_per_s"))
            timing[f"{n}/{name}"] = {"s_per_step_median": round(times[len(times) // 2], 3),
                                     "peak_rss_mb": s.get("peak_rss_mb")}
            print(n, name, timing[f"{n}/{name}"], flush=True)
    results["timing"] = timing
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
