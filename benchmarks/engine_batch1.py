"""The serving engine at batch 1: its model's linear layers with and without ``decode.split_products``.

    python benchmarks/engine_batch1.py --rounds 3 --json engine_batch1.json

``peftlab serve`` and ``peftlab chat`` decode through Hugging Face's forward inside the engine
(serve/engine.py), not through the lean decoder; at batch 1 every product is a one-row GEMV, which
torch runs on one thread. ``MultiLoRAModel`` gives the model's ``nn.Linear`` layers
``decode.linear`` (the same bits, the rows of W split over the threads). This measures one engine
with the split forwards removed and put back, alternating in one process, one request at a time
(alpaca instructions through the chat template, greedy, ``--new-tokens`` forced: no eos), with
a LoRA r=8 adapter on all linear layers (B randomised) active, and checks the tokens are the same.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import cpu_info, fmt_table, median  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_en_demo.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of both sides")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    from peftlab.config import ModelConfig
    from peftlab.model.load import load_model
    from peftlab.serve.engine import Engine, SamplingParams, Sequence
    from peftlab.serve.multi_lora import MultiLoRAModel

    torch.set_num_threads(args.threads)
    model, tok = load_model(ModelConfig(name="smollm2-135m"))
    mm = MultiLoRAModel(model)
    g = torch.Generator().manual_seed(1)
    factors = {}
    for name, m in model.named_modules():
        if type(m) is torch.nn.Linear and name != "lm_head":
            factors[name] = (torch.randn(8, m.in_features, generator=g) / m.in_features ** 0.5,
                             torch.randn(m.out_features, 8, generator=g) * 0.02)
    mm.add("bench", factors, 2.0)
    mm.set_active("bench")
    split = {m: m.forward for m in model.modules() if "forward" in vars(m)}
    engine = Engine(mm, tok, eos_ids=set())
    records = json.loads(DATA.read_text())[:args.prompts]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": r["instruction"]}],
                                            add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
               for r in records]

    def run() -> tuple[float, list]:
        out, n, t0 = [], 0, time.perf_counter()
        for p in prompts:
            s = engine.generate([Sequence(p, adapter="bench", params=SamplingParams(max_tokens=args.new_tokens))])[0]
            out.append(s.generated)
            n += len(s.generated)
        return n / (time.perf_counter() - t0), out

    rates = {"plain": [], "split": []}
    tokens = {}
    run()  # warm-up
    for _ in range(args.rounds):
        for side in ("plain", "split"):
            for m, fwd in split.items():
                if side == "split":
                    m.forward = fwd
                else:
                    del m.forward
            rate, tokens[side] = run()
            rates[side].append(rate)
            print(f"{side}: {rate:.1f} tok/s", file=sys.stderr)
    plain, fast = median(rates["plain"]), median(rates["split"])
    rows = [["engine, nn.Linear forward", f"{plain:.1f}", "1.00x", " ".join(f"{r:.1f}" for r in rates["plain"]), ""],
            ["engine, split products", f"{fast:.1f}", f"{fast / plain:.2f}x", " ".join(f"{r:.1f}" for r in rates["split"]),
             "yes" if tokens["split"] == tokens["plain"] else "NO"]]
    print(f"\n## Serving engine, batch 1, {args.new_tokens} new tokens, greedy, {args.threads} threads, "
          f"{len(split)} linear layers split\n")
    print(fmt_table(rows, ["side", "tok/s (median)", "vs plain", "per round", "tokens == plain"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"rates": rates, "same_tokens": tokens["split"] == tokens["plain"],
                                               "cpu": cpu_info(), "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
