"""LoftQ's start against QLoRA's: ||W - (Q + s B A)||_F over SmolLM2-135M's linear layers, by iteration.

    env PYTHONPATH=src python benchmarks/loftq_error.py --out benchmarks/results/loftq_error.json

For every linear layer but the head (210 in SmolLM2-135M): plain NF4 (QLoRA: B = 0, the error is
||W - q(W)||) and LoftQ with T = 1..5 alternating iterations (``methods/lora_init.loftq_init``,
r = 8, alpha = 16, peftlab's NF4). Reported: the error summed over layers (root of the sum of
squares), relative to ||W||, and the fraction of layers whose error falls at every iteration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--kind", default="nf4")
    p.add_argument("--out", default="benchmarks/results/loftq_error.json")
    args = p.parse_args()
    from peftlab.config import ModelConfig
    from peftlab.methods import lora_init
    from peftlab.methods.lowrank import LoRALinear
    from peftlab.model.load import load_model
    from peftlab.model.targets import LINEAR_TYPES, output_head_names, weight_matrix
    from peftlab.quant.layers import QuantLinear

    started = time.time()
    model, _ = load_model(ModelConfig(name="smollm2-135m", dtype="float32"), with_tokenizer=False)
    heads = output_head_names(model)
    paths = [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES) and n and n not in heads]
    total_w, plain, loftq, monotone = 0.0, 0.0, [0.0] * args.iters, 0
    for path in paths:
        base = model.get_submodule(path)
        w = weight_matrix(base).float()
        total_w += float(w.norm()) ** 2
        plain += float((w - QuantLinear.from_float(base, args.kind).dequantize(torch.float32)).norm()) ** 2
        errors = lora_init.loftq_init(LoRALinear(base, args.r, 2.0 * args.r), args.kind, args.iters)
        loftq = [a + e ** 2 for a, e in zip(loftq, errors)]
        monotone += all(b <= a for a, b in zip(errors, errors[1:]))
    rel = {"qlora (B = 0)": (plain / total_w) ** 0.5,
           **{f"loftq T={t + 1}": (e / total_w) ** 0.5 for t, e in enumerate(loftq)}}
    out = {"command": "env PYTHONPATH=src python benchmarks/loftq_error.py " + " ".join(sys.argv[1:]),
           "layers": len(paths), "r": args.r, "kind": args.kind, "relative_error": rel,
           "layers_falling_every_iteration": monotone, "wall_s": round(time.time() - started, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("| start | ||W - (Q + s B A)|| / ||W|| |\n|---|---:|")
    for k, v in rel.items():
        print(f"| {k} | {v:.5f} |")
    print(f"\n{monotone}/{len(paths)} layers fall at every iteration; {out['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
