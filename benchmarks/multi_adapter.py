"""Tokens/s of one mixed batch over 8 LoRA adapters vs the same requests run adapter by adapter,
vs one merged model (and vs Hugging Face PEFT's own mixed-adapter generate).

    flock /work/heavy.lock env PYTHONPATH=src python benchmarks/multi_adapter.py [--repeats 3]

On smollm2-135m (fp32, CPU), 8 adapters (LoRA r=16 on all linear layers, random weights), 8
requests (one per adapter; alpaca prompts, 30-60 tokens), 32 new tokens each (eos ignored so every
run generates the same number of tokens). Each configuration is timed ``--repeats`` times; the
median is reported, with ratios to the mixed batch. Configurations:

  mixed/gather    peftlab Engine, all 8 requests in one continuous batch, Punica-style gather+bmm
  mixed/grouped   the same, one matmul pair per adapter (S-LoRA/SGMV-style)
  sequential      peftlab Engine, one request at a time (each with its adapter, batch of 1)
  merged          one adapter merged into the base, the 8 requests as one batch (no LoRA math at all:
                  the ceiling for serving a single adapter)
  peft-mixed      PEFT 0.21 ``generate(..., adapter_names=[...])`` on the same 8 requests (optional)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from peftlab.config import ModelConfig  # noqa: E402
from peftlab.data.tokenize import Encoder  # noqa: E402
from peftlab.model.load import load_model  # noqa: E402
from peftlab.model.targets import find_targets, linear_shape  # noqa: E402
from peftlab.serve.engine import Engine, SamplingParams, Sequence  # noqa: E402
from peftlab.serve.multi_lora import MultiLoRAModel  # noqa: E402

DATA = Path(os.environ.get("PEFTLAB_SHARED", "/work/shared")) / "data" / "alpaca_en_demo.json"


def random_adapter(model, rank: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for path in find_targets(model, "all-linear"):
        in_f, out_f = linear_shape(model.get_submodule(path))
        a = torch.randn(rank, in_f, generator=g) / in_f**0.5
        b = torch.randn(out_f, rank, generator=g) * 0.02
        factors[path] = (a, b)
    return factors


def prompts(tokenizer, n: int) -> list[list[int]]:
    records = json.loads(DATA.read_text())
    enc = Encoder(tokenizer, "auto")
    out = []
    for r in records:
        text = (r["instruction"] + " " + r["input"]).strip()
        ids = enc.prompt_ids([{"role": "user", "content": text}])
        if 60 <= len(ids) <= 90:  # 30-60 tokens of request after the ~30-token default system prompt
            out.append(ids)
        if len(out) == n:
            return out
    raise SystemExit("not enough prompts of the wanted length")


def timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - t0, tokens


OUTPUTS: dict[str, list[list[int]]] = {}  # generated tokens of the last run of each configuration


def engine_run(key: str, engine: Engine, reqs, new_tokens: int, one_by_one: bool) -> int:
    seqs = [Sequence(ids, name, SamplingParams(max_tokens=new_tokens)) for ids, name in reqs]
    if one_by_one:
        for s in seqs:
            engine.generate([s])
    else:
        engine.generate(seqs)
    assert all(len(s.generated) == new_tokens for s in seqs)
    OUTPUTS[key] = [s.generated for s in seqs]
    return sum(len(s.generated) for s in seqs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, tok = load_model(ModelConfig(name=args.model))
    names = [f"adapter{i}" for i in range(args.adapters)]
    adapters = {n: random_adapter(model, args.rank, seed=i) for i, n in enumerate(names)}
    mm = MultiLoRAModel(model)
    for n in names:
        mm.add(n, adapters[n], scaling=2.0, alpha=2.0 * args.rank)
    reqs = list(zip(prompts(tok, args.adapters), names))
    engine = Engine(mm, tok, max_batch=args.adapters, eos_ids=set())  # eos ignored: fixed token counts

    merged_model, _ = load_model(ModelConfig(name=args.model), with_tokenizer=False)
    with torch.no_grad():  # W + s·BA of adapter0, as `peftlab merge` writes it
        for path, (a, b) in adapters[names[0]].items():
            w = merged_model.get_submodule(path).weight
            w += 2.0 * (b @ a)
    merged = Engine(MultiLoRAModel(merged_model), tok, max_batch=args.adapters, eos_ids=set())

    def mode(m: str) -> None:
        mm.router.mode = m

    runs = {
        "mixed/gather": lambda: mode("gather") or engine_run("mixed/gather", engine, reqs, args.new_tokens, False),
        "mixed/grouped": lambda: mode("grouped") or engine_run("mixed/grouped", engine, reqs, args.new_tokens, False),
        "sequential": lambda: mode("auto") or engine_run("sequential", engine, reqs, args.new_tokens, True),
        "merged": lambda: engine_run("merged", merged, [(ids, None) for ids, _ in reqs], args.new_tokens, False),
    }

    if not args.no_peft:
        from peft import PeftModel

        tmp = Path(tempfile.mkdtemp())
        peft_base, _ = load_model(ModelConfig(name=args.model), with_tokenizer=False)
        pm = None
        for n in names:
            mm.save(n, tmp / n)
            pm = PeftModel.from_pretrained(peft_base, tmp / n, adapter_name=n) if pm is None else pm
            if n != names[0]:
                pm.load_adapter(tmp / n, adapter_name=n)
        pm.eval()
        width = max(len(ids) for ids, _ in reqs)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in reqs])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in reqs])

        def peft_run() -> int:
            with torch.no_grad():
                out = pm.generate(input_ids=input_ids, attention_mask=mask, adapter_names=names,
                                  max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad,
                                  eos_token_id=None)  # like the engine: eos may be chosen, never stops
            OUTPUTS["peft-mixed"] = out[:, width:].tolist()
            return int((out.shape[1] - width) * out.shape[0])

        runs["peft-mixed"] = peft_run

    for fn in runs.values():  # warm-up (allocator, first-call overheads)
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    tokens = {}
    for _ in range(args.repeats):
        for key, fn in runs.items():  # interleaved, so drift in machine load hits every config alike
            dt, n = timed(fn)
            times[key].append(dt)
            tokens[key] = n
    # the same answers whichever way they were batched (greedy; PEFT's numerics differ slightly, so: agreement)
    assert OUTPUTS["mixed/gather"] == OUTPUTS["sequential"] == OUTPUTS["mixed/grouped"], "batching changed outputs"
    agree = {k: sum(x == y for a, b in zip(v, OUTPUTS["sequential"]) for x, y in zip(a, b)) / tokens[k]
             for k, v in OUTPUTS.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: tokens[k] / med[k] for k in runs}
    ref = tps["mixed/gather"]
    print(f"{args.model}, {args.adapters} adapters (r={args.rank}, all-linear), {args.adapters} requests x "
          f"{args.new_tokens} new tokens, {args.threads} threads, median of {args.repeats}")
    print(f"{'configuration':<16}{'median s':>10}{'tokens/s':>10}{'mixed/gather is':>18}{'same tokens':>13}")
    for k in runs:
        print(f"{k:<16}{med[k]:>10.2f}{tps[k]:>10.1f}{ref / tps[k]:>17.2f}x{agree[k]:>12.1%}")
    result = {"model": args.model, "adapters": args.adapters, "rank": args.rank, "new_tokens": args.new_tokens,
              "threads": args.threads, "repeats": args.repeats, "times_s": times, "median_s": med,
              "tokens_per_s": tps, "speedup_of_mixed_gather": {k: ref / tps[k] for k in runs},
              "token_agreement_with_sequential": agree}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
