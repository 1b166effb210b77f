"""S-LoRA's scale: a thousand adapters behind one base, a bounded number resident (issue 18).

    python benchmarks/adapter_scale.py [--adapters 1000] [--resident 8] [--requests 64] [--repeats 2]

On smollm2-135m (fp32, CPU): ``--adapters`` LoRA adapters (rank ``--rank`` on q_proj and v_proj,
random weights large enough that every adapter changes the answers) are saved as PEFT directories
in one adapters directory, the way ``peftlab serve --adapters DIR`` reads them. ``--requests``
requests (alpaca prompts, ``--new-tokens`` greedy tokens each, eos ignored) go through the
continuous-batching Engine, ``max_batch`` 8. Configurations, each in its own process (peak RSS is
that process's), run alternately ``--repeats`` times, medians reported:

  N adapters      every request names a different adapter (spread over all N); the AdapterStore keeps
                  at most ``--resident`` of them in the stacked slots where the math runs, the rest in
                  host memory (``host_max``), loading and evicting as requests come
  8 adapters      the same requests over only 8 adapters, all resident
  merged          one adapter merged into the base, no LoRA math at all (the ceiling)

Correctness ("wrong-adapter answers"): after the timed runs, every request of the N-adapter run is
generated again alone, on a fresh model with only its own adapter loaded from its directory; its
tokens must equal the batched run's. "distinct answers" counts how many different answers the
requests got (adapters that all answered alike would prove nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import alternate, median, peak_rss_gb, run_worker  # noqa: E402


def make_adapters(root: Path, n: int, rank: int, model_name: str) -> None:
    """``n`` PEFT LoRA directories: the first written by MultiLoRAModel.save, the rest with its config
    files and their own random factors (what save would write, without n fingerprint passes)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from peftlab.config import ModelConfig
    from peftlab.model.load import load_model
    from peftlab.model.targets import find_targets, linear_shape
    from peftlab.registry import PEFT_PREFIX
    from peftlab.serve.multi_lora import MultiLoRAModel

    model, _ = load_model(ModelConfig(name=model_name), with_tokenizer=False)
    shapes = {p: linear_shape(model.get_submodule(p)) for p in find_targets(model, ["q_proj", "v_proj"])}
    mm = MultiLoRAModel(model)
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        factors = {p: (torch.randn(rank, i_f, generator=g) / i_f**0.5, torch.randn(o_f, rank, generator=g) * 0.5)
                   for p, (i_f, o_f) in shapes.items()}
        if i == 0:
            mm.add("a", factors, scaling=1.0, alpha=float(rank))
            mm.save("a", root / "a0000", base_model_name=model_name)
            continue
        out = root / f"a{i:04d}"
        out.mkdir()
        for f in (root / "a0000").iterdir():
            if f.suffix == ".json":
                shutil.copy(f, out / f.name)
        state = {}
        for p, (a, b) in factors.items():
            state[f"{PEFT_PREFIX}{p}.lora_A.weight"], state[f"{PEFT_PREFIX}{p}.lora_B.weight"] = a, b
        save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def prompts(tokenizer, n: int) -> list[list[int]]:
    from peftlab.data.tokenize import Encoder

    data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca_en_demo.json"
    enc = Encoder(tokenizer, "auto")
    out = []
    for r in json.loads(data.read_text()):
        ids = enc.prompt_ids([{"role": "user", "content": (r["instruction"] + " " + r["input"]).strip()}])
        if 50 <= len(ids) <= 90:
            out.append(ids)
        if len(out) == n:
            return out
    raise SystemExit("not enough prompts of the wanted length")


def worker(spec: dict) -> dict:
    import torch

    from peftlab.config import ModelConfig
    from peftlab.model.load import load_model
    from peftlab.serve.engine import Engine, SamplingParams, Sequence
    from peftlab.serve.multi_lora import MultiLoRAModel
    from peftlab.serve.store import AdapterStore

    torch.set_num_threads(spec["threads"])
    model, tok = load_model(ModelConfig(name=spec["model"]))
    root = Path(spec["root"])
    reqs = list(zip(prompts(tok, spec["requests"]), spec["names"]))
    mm = MultiLoRAModel(model)
    store = None
    if spec["kind"] == "merged":
        from peftlab.serve.lora_dir import read_lora_dir

        _, factors = read_lora_dir(root / spec["names"][0])
        with torch.no_grad():
            for path, (a, b) in factors.items():
                mm.model.get_submodule(path).weight += b @ a
        reqs = [(ids, None) for ids, _ in reqs]
    else:
        store = AdapterStore(mm, root, max_loaded=spec["resident"], host_max=spec.get("host_max"))
    engine = Engine(mm, tok, store=store, max_batch=8, eos_ids=set(), max_queue=len(reqs))
    t0 = time.perf_counter()
    seqs = engine.generate([Sequence(ids, name, SamplingParams(max_tokens=spec["new_tokens"])) for ids, name in reqs])
    dt = time.perf_counter() - t0
    out = {"seconds": dt, "tokens": sum(len(s.generated) for s in seqs), "peak_rss_gb": peak_rss_gb(),
           "answers": [s.generated for s in seqs]}
    if store is not None:
        out.update(loads=store.loads, evictions=store.evictions, disk_reads=getattr(store, "disk_reads", None),
                   resident_max=spec["resident"])
    if spec.get("verify"):  # each request alone, its own adapter only, on a fresh model
        wrong = 0
        for (ids, name), s in zip(reqs, seqs):
            fresh = MultiLoRAModel(load_model(ModelConfig(name=spec["model"]), with_tokenizer=False)[0])
            fresh.load(name, root / name)
            alone = Engine(fresh, tok, max_batch=1, eos_ids=set()).generate(
                [Sequence(ids, name, SamplingParams(max_tokens=spec["new_tokens"]))])[0]
            wrong += alone.generated != s.generated
        out["wrong_adapter_answers"] = wrong
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--resident", type=int, default=8)
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verify", type=int, default=16, help="requests re-generated alone to check their adapter")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    root = Path(tempfile.mkdtemp(prefix="peftlab-scale-")) / "adapters"
    root.mkdir()
    t0 = time.perf_counter()
    make_adapters(root, args.adapters, args.rank, args.model)
    print(f"wrote {args.adapters} adapters in {time.perf_counter() - t0:.0f} s "
          f"({sum(f.stat().st_size for f in root.rglob('*') if f.is_file()) / 2**20:.0f} MiB)", file=sys.stderr)
    step = 7919  # a prime: request j names adapter (j * step) mod N, all different for j < N
    spread = [f"a{(j * step) % args.adapters:04d}" for j in range(args.requests)]
    common = {"model": args.model, "root": str(root), "requests": args.requests, "new_tokens": args.new_tokens,
              "threads": args.threads, "resident": args.resident}
    configs = {f"{args.adapters} adapters, {args.resident} resident": {**common, "kind": "store", "names": spread},
               "8 adapters, all resident": {**common, "kind": "store", "resident": 8,
                                            "names": [spread[j % 8] for j in range(args.requests)]},
               "merged (one adapter)": {**common, "kind": "merged", "names": spread}}
    runs: dict[str, list[dict]] = {k: [] for k in configs}
    for i, key in enumerate(alternate(list(configs), args.repeats)):
        spec = {**configs[key], "name": key, "verify": args.verify if len(runs[key]) == 0 and "store" ==
                configs[key]["kind"] and key.startswith(str(args.adapters)) else 0}
        r = run_worker(Path(__file__), spec)
        runs[key].append(r)
        print(f"{i + 1}: {key}: {r['seconds']:.1f} s, rss {r['peak_rss_gb']} GB", file=sys.stderr)
    big = next(iter(configs))
    answers = runs[big][0]["answers"]
    table = {}
    for key, rs in runs.items():
        tps = median([r["tokens"] / r["seconds"] for r in rs])
        table[key] = {"tokens_per_s": round(tps, 1), "peak_rss_gb": median([r["peak_rss_gb"] for r in rs]),
                      "loads": rs[0].get("loads"), "evictions": rs[0].get("evictions"),
                      "disk_reads": rs[0].get("disk_reads")}
    ref = table[big]["tokens_per_s"]
    print(f"{args.model}; {args.requests} requests x {args.new_tokens} tokens, max_batch 8, rank {args.rank} on "
          f"q_proj,v_proj; {args.threads} threads; median of {args.repeats}")
    print(f"{'configuration':<30}{'tokens/s':>10}{'vs N':>8}{'peak RSS GB':>13}{'loads':>7}{'evictions':>11}")
    for key, t in table.items():
        print(f"{key:<30}{t['tokens_per_s']:>10}{t['tokens_per_s'] / ref:>7.2f}x{t['peak_rss_gb']:>13}"
              f"{str(t['loads']):>7}{str(t['evictions']):>11}")
    verdict = {"wrong_adapter_answers": runs[big][0].get("wrong_adapter_answers"), "verified": args.verify,
               "distinct_answers": len({tuple(a) for a in answers}), "requests": args.requests}
    print(json.dumps(verdict))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "table": table, **verdict}, indent=2))


if __name__ == "__main__":
    main()
