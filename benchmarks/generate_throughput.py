"""Generation throughput with a KV cache: HF ``generate`` vs peftlab's lean decoder, adapters
merged and unmerged, batch 1 and 8, greedy.

    flock /work/heavy.lock python benchmarks/generate_throughput.py

Model: smollm2-135m with a LoRA r=8 adapter on all linear layers (B randomised, so the adapter
changes the output). Prompts: alpaca_en_demo instructions through the chat template (left
padded in batches of 8). Every configuration runs in its own subprocess, configurations
alternate within each repeat, figures are medians. New tokens are forced to ``--new-tokens``
(no early stop) so every side does the same work. The lean decoder's output is compared with
HF ``generate``'s token for token on the same prompts.

Sides: hf (HF generate, peftlab LoRA layers on their plain autograd path, i.e. the module
overhead of an unmerged PEFT adapter), lean (peftlab.eval.decode.lean_greedy); each with the
adapter unmerged or merged into the base weights.

A second table is batch 1 only, every prompt decoded alone (tokens/s = all new tokens / all
time), on two workloads: ``alpaca`` (the 8 prompts above) and ``copy`` (8 prompts that ask to
rewrite an alpaca answer of 200-600 characters with its spelling fixed, so the answer copies the
prompt). Sides add prompt-lookup speculative decoding: lookup (peftlab.model.lookup.lookup_greedy,
``--lookup`` tokens drafted per forward) and hf-lookup (HF ``generate(prompt_lookup_num_tokens=)``,
HF's own version of the same trick). Acceptance = accepted / drafted tokens (lookup);
tokens == HF compares every continuation with the hf side's (same adapter state, same workload).
``--tables lookup`` runs only this table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import alternate, fmt_table, median, peak_rss_gb, run_worker  # noqa: E402

DATA = Path("/work/shared/data/alpaca_en_demo.json")
COPY = "Rewrite the following text, fixing any spelling mistakes:\n\n{}"


def _setup(spec):
    import torch

    from peftlab.config import ModelConfig
    from peftlab.data.tokenize import Encoder
    from peftlab.methods import lora
    from peftlab.methods.lowrank import lora_layers
    from peftlab.model.load import load_model

    torch.set_num_threads(spec["threads"])
    model, tok = load_model(ModelConfig(name="smollm2-135m", dtype=spec["dtype"]))
    torch.manual_seed(0)
    lora.apply(model, lora.LoRAConfig(r=8, alpha=16, targets="all-linear"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.02)
            m.fast_path = False  # HF generate runs the adapter as a plain (PEFT-like) module
    if spec["merged"]:
        lora.merge(model)
    model.eval()
    enc = Encoder(tok, "chat", 512)
    records = json.loads(DATA.read_text())
    if spec.get("workload") == "copy":
        texts = [COPY.format(r["output"]) for r in records if 200 <= len(r["output"]) <= 600][:8]
    else:
        texts = [r["instruction"] + ("\n" + r["input"] if r["input"] else "") for r in records[:8]]
    prompts = [enc.prompt_ids([{"role": "user", "content": t}]) for t in texts]
    return model, tok, prompts


def _batch(prompts, pad):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def gemv_bandwidth(threads: int) -> dict:
    """GB/s that a batch-1 product with a [49152, 576] matrix (the LM head) streams, per dtype and
    kernel: ``F.linear`` (torch's CPU GEMV, one thread whatever the thread count) and, in fp32,
    ``decode.linear`` (the same product cut into one block of rows per thread). Batch-1 decoding
    reads every weight once per token, so weight bytes / the faster one is its floor."""
    import torch
    import torch.nn.functional as F

    from peftlab.model.decode import linear

    torch.set_num_threads(threads)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        w, x = torch.randn(49152, 576).to(dtype), torch.randn(1, 576).to(dtype)
        kernels = {"F.linear": F.linear} | ({"split": linear} if dtype == torch.float32 else {})
        for name, fn in kernels.items():
            for _ in range(3):
                fn(x, w)
            times = []
            for _ in range(30):
                t0 = time.perf_counter()
                fn(x, w)
                times.append(time.perf_counter() - t0)
            times.sort()
            key = str(dtype).replace("torch.", "") + ("" if name == "F.linear" else " split")
            out[key] = w.numel() * w.element_size() / times[len(times) // 4] / 1e9
    return out


def worker(spec: dict) -> None:
    import torch

    from peftlab.eval import decode

    if spec["side"] == "gemv":
        print(json.dumps({"gbps": gemv_bandwidth(spec["threads"])}))
        return

    model, tok, prompts = _setup(spec)
    pad = tok.pad_token_id
    n = spec["new_tokens"]
    model.config.use_cache = True
    model.generation_config.eos_token_id = None
    if spec.get("workload"):
        print(json.dumps(_batch1_workload(spec, model, prompts, pad)))
        return

    def run(ids, mask):
        if spec["side"] == "lean":
            return decode.lean_greedy(model, ids, mask, n, [], pad)
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=pad, temperature=None, top_p=None, top_k=None)

    out = {"side": spec["side"], "merged": spec["merged"]}
    tokens = {}
    for bs in (1, 8):
        ids, mask = _batch(prompts[:bs], pad)
        run(ids, mask)  # warm-up (and the lean decoder's fused weights)
        times = []
        for _ in range(spec["reps"]):
            t0 = time.perf_counter()
            res = run(ids, mask)
            times.append(time.perf_counter() - t0)
        new = res[:, ids.shape[1]:]
        assert new.shape[1] == n, new.shape
        out[f"b{bs}_tok_s"] = bs * n / median(times)
        tokens[bs] = new.tolist()
    out["tokens"] = tokens
    out["rss"] = peak_rss_gb()
    print(json.dumps(out))


def _batch1_workload(spec: dict, model, prompts: list, pad: int) -> dict:
    """Batch 1, every prompt alone, ``spec["reps"]`` times: tokens/s over all of them, the new
    tokens, and (lookup) the drafted / accepted counts of the last repeat."""
    import torch

    from peftlab.eval import decode
    from peftlab.model.lookup import lookup_greedy

    n, side, k = spec["new_tokens"], spec["side"], spec["lookup"]
    counts = {"forwards": 0, "verified": 0, "drafted": 0, "accepted": 0}

    def run(ids):
        mask = torch.ones_like(ids)
        if side == "lean":
            return decode.lean_greedy(model, ids, mask, n, [], pad)
        if side == "lookup":
            st = {}
            out = lookup_greedy(model, ids, mask, n, [], lookup=k, stats=st)
            for key in counts:
                counts[key] += st[key]
            return out
        extra = {"prompt_lookup_num_tokens": k} if side == "hf-lookup" else {}
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=pad, temperature=None, top_p=None, top_k=None,
                                  **extra)

    run(torch.tensor([prompts[0]]))  # warm-up (and the lean decoder's fused weights)
    times = []
    for _ in range(spec["reps"]):
        counts = dict.fromkeys(counts, 0)
        tokens, t0 = [], time.perf_counter()
        for p in prompts:
            out = run(torch.tensor([p]))
            tokens.append(out[0, len(p):].tolist())
        times.append(time.perf_counter() - t0)
        assert all(len(t) == n for t in tokens), [len(t) for t in tokens]
    return {"side": side, "merged": spec["merged"], "tok_s": len(prompts) * n / median(times),
            "tokens": tokens, **counts}


def lookup_table(args) -> tuple[str, dict]:
    """Batch 1, fp32: hf, hf-lookup, lean, lookup, unmerged and merged, on both workloads."""
    configs = {}
    for workload in ("alpaca", "copy"):
        for side in ("hf", "hf-lookup", "lean", "lookup"):
            for merged in (False, True):
                configs[f"{workload} {side} {'merged' if merged else 'unmerged'}"] = {
                    "side": side, "merged": merged, "dtype": "float32", "new_tokens": args.new_tokens,
                    "reps": args.reps, "threads": args.threads, "workload": workload, "lookup": args.lookup}
    runs = {k: [] for k in configs}
    for key in alternate(list(configs), args.repeats):
        r = run_worker(Path(__file__), {**configs[key], "name": key})
        runs[key].append(r)
        print(f"{key}: batch 1 {r['tok_s']:.1f} tok/s", file=sys.stderr)
    rows, summary = [], {}
    for key, rs in runs.items():
        workload, side, state = key.split()
        hf = runs[f"{workload} hf unmerged"]
        tok_s = median([r["tok_s"] for r in rs])
        drafted, accepted = rs[0]["drafted"], rs[0]["accepted"]
        pairs = [(a, b) for a, b in zip(rs[0]["tokens"], runs[f"{workload} hf {state}"][0]["tokens"])]
        differ = sum(x != y for a, b in pairs for x, y in zip(a, b))
        summary[key] = {"tok_s": tok_s, "drafted": drafted, "accepted": accepted, "tokens_differing": differ,
                        "forwards": rs[0]["forwards"], "verified": rs[0]["verified"]}
        rows.append([key, f"{tok_s:.1f}", f"{tok_s / median([r['tok_s'] for r in hf]):.2f}x",
                     f"{accepted / drafted:.2f} ({accepted}/{drafted})" if drafted else "",
                     "" if side == "hf" else f"{sum(a == b for a, b in pairs)} of {len(pairs)}, {differ} tokens differ"])
    text = fmt_table(rows, ["workload side adapter", "batch 1 tok/s", "vs hf unmerged", "lookup acceptance",
                            "continuations == HF generate"])
    return (f"\n## Batch 1, fp32, every prompt alone, {args.new_tokens} new tokens, greedy, lookup {args.lookup}, "
            f"{args.threads} threads\n\n{text}"), summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="alternating repeats of every configuration")
    ap.add_argument("--reps", type=int, default=3, help="timed generations per batch size inside a run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto",
                    help="comma-separated model dtypes; auto: float32, plus bfloat16 where the CPU has native bf16")
    ap.add_argument("--lookup", type=int, default=10, help="tokens drafted per forward by the lookup sides")
    ap.add_argument("--tables", default="main,lookup", help="main (hf vs lean, batch 1 and 8), lookup, or both")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    out = {"args": vars(args)}
    if "lookup" in args.tables.split(","):
        text, out["lookup"] = lookup_table(args)
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
    if "main" not in args.tables.split(","):
        return
    if args.dtype == "auto":
        from peftlab.train.runtime import cpu_has_bf16

        args.dtype = "float32,bfloat16" if cpu_has_bf16() else "float32"
    configs = {}
    for dtype in args.dtype.split(","):
        for side in ("hf", "lean"):
            for merged in (False, True):
                configs[f"{side} {'merged' if merged else 'unmerged'} {dtype}"] = {
                    "side": side, "merged": merged, "dtype": dtype, "new_tokens": args.new_tokens,
                    "reps": args.reps, "threads": args.threads}
    runs = {k: [] for k in configs}
    for key in alternate(list(configs), args.repeats):
        r = run_worker(Path(__file__), {**configs[key], "name": key})
        runs[key].append(r)
        print(f"{key}: b1 {r['b1_tok_s']:.1f} tok/s, b8 {r['b8_tok_s']:.1f} tok/s", file=sys.stderr)
    rows, summary = [], {}
    for key, rs in runs.items():
        dtype = configs[key]["dtype"]
        hf_key = f"hf unmerged {dtype}"
        s = {"b1": median([r["b1_tok_s"] for r in rs]), "b8": median([r["b8_tok_s"] for r in rs]),
             "rss": median([r["rss"] for r in rs])}
        summary[key] = s
        base = summary.get(hf_key) or s
        same = "" if configs[key]["side"] == "hf" else (
            "yes" if rs[0]["tokens"] == runs[key.replace("lean", "hf")][0]["tokens"] else
            f"{_agree(rs[0]['tokens'], runs[key.replace('lean', 'hf')][0]['tokens']):.3f}")
        rows.append([key, f"{s['b1']:.1f}", f"{s['b1'] / base['b1']:.2f}x", f"{s['b8']:.1f}",
                     f"{s['b8'] / base['b8']:.2f}x", f"{s['rss']:.2f}", same])
    text = fmt_table(rows, ["config", "batch 1 tok/s", "vs hf unmerged", "batch 8 tok/s", "vs hf unmerged",
                            "peak RSS GB", "tokens == HF generate"])
    bw = run_worker(Path(__file__), {"side": "gemv", "threads": args.threads, "name": "gemv"})["gbps"]
    weights = 134_515_008  # SmolLM2-135M parameters, each read once per decoded token at batch 1
    floor = "; ".join(f"{d}: {g:.1f} GB/s -> at best {g * 1e9 / (weights * (2 if 'bfloat16' in d else 4)):.1f} "
                      f"tokens/s at batch 1" for d, g in bw.items())
    print(f"\n## Generation, {args.new_tokens} new tokens, greedy, {args.threads} threads\n\n{text}\n\n"
          f"Batch-1 GEMV over the LM head (F.linear; split = decode.linear, a block of rows per thread): {floor}")
    summary["gemv_gbps"] = bw
    if args.json:
        Path(args.json).write_text(json.dumps({**out, "summary": summary}, indent=1))


def _agree(a: dict, b: dict) -> float:
    """Fraction of (batch size, row) continuations that are identical."""
    pairs = [(x, y) for k in a for x, y in zip(a[k], b[k])]
    return sum(x == y for x, y in pairs) / max(len(pairs), 1)


if __name__ == "__main__":
    main()
