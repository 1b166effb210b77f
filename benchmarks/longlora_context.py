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

    python benchmarks/longlora_context.py --speed [--lengths 4096,8192] [--repeats 3]

``--speed`` is the time and memory comparison where attention dominates the step, which the model
above cannot show (its 49k-token LM head dominates): a tiny Llama with a 1,024-token vocabulary
(hidden 256, 4 heads of 64, 2 layers, FFN 512), one sequence of N random ids, LongLoRA's trainable
set (LoRA r=8 on q,k,v,o + embeddings and norms, interpolation x N/512), S²-Attn (groups of N/4)
against full attention (``group_ratio=1``: the model's own SDPA attention), in training mode. Each
(variant, N) is a fresh subprocess (its own peak RSS) timing ``--steps`` optimiser steps after one
warm-up step; the variants alternate within every repeat and the figures are medians over repeats.
Writes benchmarks/results/longlora_speed.json.
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
from _bench import ROOT, alternate, median, run_worker, worker_env  # noqa: E402

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


SPEED_TINY = {"hidden": 256, "layers": 2, "heads": 4, "kv_heads": 4, "intermediate": 512, "vocab": 1024,
              "max_position_embeddings": 512, "tie_word_embeddings": True}


def speed_worker(spec: dict) -> None:
    """One (variant, N): time ``steps`` training steps after a warm-up; print a JSON line."""
    import resource
    import time

    import torch

    from peftlab.configure import load_config
    from peftlab.model.load import load_model
    from peftlab.train.setup import prepared_model
    from peftlab.train.step import start_training, train_step

    torch.set_num_threads(spec["threads"])
    n = spec["n"]
    cfg = load_config(None, ["model.name=config:llama", *[f"model.config_overrides.{k}={v}" for k, v in
                                                           SPEED_TINY.items()],
                             "peft.method=longlora", "peft.r=8", f"peft.context_factor={n // 512}",
                             f"peft.group_ratio={spec['ratio']}", "train.mixed_precision=no", "train.lr=1e-4"])
    model, _ = load_model(cfg.model, seed=0, with_tokenizer=False)
    model, _ = prepared_model(cfg, model, None)
    state = start_training(model, cfg, spec["steps"] + 1)
    ids = torch.randint(3, SPEED_TINY["vocab"], (1, n), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    times = []
    for i in range(spec["steps"] + 1):
        t0 = time.perf_counter()
        train_step(state, [batch])
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    print(json.dumps({"name": spec["name"], "n": n, "step_s": [round(t, 3) for t in times],
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def speed(args) -> None:
    variants = {"s2attn": "0.25", "full": "1"}
    runs: dict = {}
    for n in [int(x) for x in args.lengths.split(",")]:
        for name in alternate(list(variants), args.repeats):
            out = run_worker(Path(__file__), {"name": name, "n": n, "ratio": variants[name], "steps": args.steps,
                                              "threads": args.threads})
            runs.setdefault(f"{n}/{name}", []).append(out)
            print(n, name, out, flush=True)
    summary = {key: {"s_per_step_median": median([median(r["step_s"]) for r in rs]),
                     "peak_rss_mb_median": median([r["peak_rss_mb"] for r in rs]), "repeats": len(rs)}
               for key, rs in runs.items()}
    results = {"tiny": SPEED_TINY, "threads": args.threads, "steps": args.steps, "summary": summary, "runs": runs}
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(summary, indent=2))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return speed_worker(json.loads(sys.argv[2]))
    if "--speed" in sys.argv:
        ap = argparse.ArgumentParser(description="S²-Attn vs full attention where attention dominates")
        ap.add_argument("--speed", action="store_true")
        ap.add_argument("--lengths", default="4096,8192")
        ap.add_argument("--repeats", type=int, default=3)
        ap.add_argument("--steps", type=int, default=2)
        ap.add_argument("--threads", type=int, default=1)
        ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "longlora_speed.json"))
        return speed(ap.parse_args())
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
