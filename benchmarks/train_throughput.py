"""Training throughput, memory and FLOP utilisation: peftlab vs Hugging Face PEFT, measured here.

    flock /work/heavy.lock python benchmarks/train_throughput.py --suite main

Model: the real offline base model (smollm2-135m, SmolLM2-135M-Instruct). Method: LoRA r=8,
alpha=16, dropout 0, all linear layers (2,442,240 trainable), or full fine-tuning. Data: the
same examples in the same order on every side, built once by peftlab's data pipeline
(alpaca_en_demo.json through SmolLM2's chat template, prompt tokens masked; or fixed-length
512-token text blocks). Same seed, same LoRA initialisation (loaded from one file), AdamW
lr 2e-4, cosine, no warmup, clip 1.0, batch 4. Precision follows the CPU (``--precision auto``):
bf16 autocast (fp32 master weights) where it has native bf16 (avx512_bf16 / amx_bf16), float32
otherwise, where a bf16 GEMM runs at ~1 GFLOP/s and only the float32 peak is measured.

Sides (each run in its own subprocess; sides alternate within every repeat; medians):
  peftlab       peftlab.train.loop.train (the product's own loop), speed levers at defaults
  peft_trainer  HF PEFT 0.21 + transformers Trainer (bf16 as the precision says, use_cpu=True)
  peft_loop     HF PEFT in a plain PyTorch loop (model(**batch).loss, AdamW, clip, schedule)

Figures: real (non-pad) tokens/s over the timed steps (after warm-up), label tokens/s, peak
RSS of the worker process, model FLOP utilisation = useful FLOPs/s over the bf16 (or fp32)
GEMM peak that torch.mm reaches in this same run. Useful FLOPs count the frozen/trained
linear layers on real tokens, the LM head on label tokens and causal attention on real
pairs; a side that computes the head on prompt or padding rows gets no credit for it.
Loss curves: peftlab's per-step losses against PEFT's, and the two PEFT sides against each
other (the noise of one bf16 implementation vs another), printed and checked.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import (  # noqa: E402
    ROOT,
    alternate,
    fmt_table,
    gemm_peak,
    median,
    peak_rss_gb,
    run_worker,
    wait_quiet,
)

DATA_DIR = Path(os.environ.get("PEFTLAB_SHARED_DATA", ROOT.parent.parent / "shared" / "data"))
if not DATA_DIR.exists():
    DATA_DIR = Path("/work/shared/data")
MODEL = "smollm2-135m"
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


# ============================================================================ workloads


def sft_data(max_length: int = 512) -> dict:
    return {"path": str(DATA_DIR / "alpaca_en_demo.json"), "format": "alpaca", "template": "chat",
            "max_length": max_length}


def fixed_data(tmp: Path, max_length: int = 512) -> dict:
    """Pre-packed data: every row exactly ``max_length`` tokens, every token a label.

    c4_demo documents are joined into texts of >= 4,000 characters (well over 512 tokens) that
    the encoder truncates to ``max_length``: pure compute, nothing for packing to win."""
    path = tmp / "fixed_blocks.jsonl"
    if not path.exists():
        docs = [json.loads(ln)["text"] for ln in (DATA_DIR / "c4_demo.jsonl").read_text().splitlines() if ln.strip()]
        out, buf = [], ""
        for d in docs:
            buf += d + "\n"
            if len(buf) >= 4000:
                out.append(json.dumps({"text": buf}))
                buf = ""
        path.write_text("\n".join(out) + "\n")
    return {"path": str(path), "format": "text", "template": "auto", "max_length": max_length}


def short_data() -> dict:
    """Short chat rows with exact answers (builtin:tasks, ~50 tokens, 41-74): the closed-task shape
    whose padding is a third of a batch and whose answers are a sixth of its tokens."""
    return {"path": "builtin:tasks", "template": "auto", "max_length": 512}


def data_overrides(data: dict) -> list[str]:
    return [f"data.{k}={v}" for k, v in data.items()] + ["data.eval_split=0"]


# ============================================================================ FLOPs


def model_shapes(model) -> dict:
    """Parameter counts the FLOP model needs: body linear layers, LM head, LoRA factors."""
    from torch import nn

    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and m is not head and "lora_" not in n)
    cfg = model.config
    attn_dim = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    return {"body": body, "head": head.weight.numel(), "layers": cfg.num_hidden_layers, "attn_dim": attn_dim}


def useful_flops(shapes: dict, method: str, lora_params: int, tokens: int, labels: int, pairs: int) -> float:
    """FLOPs of the work that has to be done (forward + backward), per the usual 2/4/6 rule:
    frozen linear weights 4 FLOPs per parameter per token (no weight gradient), trained ones 6;
    the head on label rows only; attention 12 * attn_dim FLOPs per causal (query, key) pair."""
    if method == "full":
        per_token, per_label = 6 * shapes["body"], 6 * shapes["head"]
    else:
        per_token, per_label = 4 * shapes["body"] + 6 * lora_params, 4 * shapes["head"]
    attn = 12 * shapes["attn_dim"] * shapes["layers"]
    return tokens * per_token + labels * per_label + pairs * attn


# ============================================================================ the worker


def _examples_and_batches(spec: dict, tokenizer):
    """The batches every side trains on, in order (peftlab's data pipeline and sampler)."""
    from peftlab.configure import load_config
    from peftlab.data.dataset import build_datasets
    from peftlab.data.sampler import BatchSampler

    cfg = load_config(None, data_overrides(spec["data"]) + [f"data.packing={spec.get('packing', False)}"])
    data = build_datasets(cfg.data, tokenizer, spec["seed"])
    if hasattr(data, "sampler"):
        sampler = data.sampler(spec["batch_size"], spec["seed"], True, 0, 1)
    else:
        sampler = BatchSampler(len(data.train), spec["batch_size"], spec["seed"], True)
    groups = [[data.train[i] for i in sampler.next()] for _ in range(spec["steps"])]
    stats = []
    for g in groups:
        lens = [list(getattr(e, "seq_lens", None) or (len(e),)) for e in g]
        stats.append({"tokens": sum(len(e) for e in g),
                      "labels": sum(sum(1 for t in e.labels[1:] if t != -100) for e in g),
                      "pairs": sum(n * (n + 1) // 2 for ls in lens for n in ls),
                      "width": max(len(e) for e in g)})
    return data, groups, stats


def _peftlab_overrides(spec: dict, out_dir: str) -> list[str]:
    t = spec
    ov = [f"model.name={MODEL}", f"peft.method={t['method']}"]
    if t["method"] == "lora":
        ov += ["peft.r=8", "peft.alpha=16", "peft.dropout=0", "peft.targets=all-linear"]
    ov += data_overrides(t["data"])
    ov += [f"train.steps={t['steps']}", f"train.batch_size={t['batch_size']}", f"train.lr={t['lr']}",
           "train.warmup=0", "train.schedule=cosine", "train.eval_every=0", "train.log_every=1",
           "train.save_every=0", f"train.output_dir={out_dir}", f"train.seed={t['seed']}",
           f"train.mixed_precision={t['precision']}", f"train.threads={t['threads']}", "train.progress=false",
           "train.max_grad_norm=1.0", "train.weight_decay=0"]
    return ov + list(t.get("overrides", []))


def worker_peftlab(spec: dict) -> dict:
    from peftlab.configure import load_config
    from peftlab.model.load import load_tokenizer
    from peftlab.train.loop import train

    marks, losses = [], []

    def cb(rec):
        marks.append(time.perf_counter())
        losses.append(rec["loss"])

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, _peftlab_overrides(spec, tmp))
        res = train(cfg, callbacks=[cb])
        shapes = model_shapes(res.model)
        lora = sum(p.numel() for n, p in res.model.named_parameters() if "lora_" in n)
    tok = load_tokenizer(MODEL)
    _, _, stats = _examples_and_batches({**spec, "packing": cfg.data.packing}, tok)
    return {"marks": marks, "losses": losses, "stats": stats, "shapes": shapes, "lora_params": lora}


def _hf_model(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    from peftlab.model.load import asset_dir

    path = asset_dir(MODEL)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    if spec["method"] == "lora":
        from peft import LoraConfig, get_peft_model
        from safetensors.torch import load_file

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        init = load_file(spec["init_file"])
        named = dict(model.named_parameters())
        with torch.no_grad():
            for path_, a in init.items():  # peftlab's path -> PEFT's name
                named[f"base_model.model.{path_}.lora_A.default.weight"].copy_(a)
                named[f"base_model.model.{path_}.lora_B.default.weight"].zero_()
        loaded = len(init)
        assert loaded == sum(1 for n in named if n.endswith("lora_A.default.weight")), "LoRA init mismatch"
    if spec.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def worker_peft_loop(spec: dict) -> dict:
    import torch

    from peftlab.model.load import load_tokenizer
    from peftlab.train.optim import lr_factor

    torch.manual_seed(spec["seed"])
    tok = load_tokenizer(MODEL)
    data, groups, stats = _examples_and_batches(spec, tok)
    model = _hf_model(spec)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], betas=(0.9, 0.999), weight_decay=0.0)
    n = spec["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, n, 0, "cosine", 0.0))
    amp = spec["precision"] == "bf16"
    marks, losses = [], []
    for g in groups:
        batch = data.collate(g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        marks.append(time.perf_counter())
    return {"marks": marks, "losses": losses, "stats": stats}


def worker_peft_trainer(spec: dict) -> dict:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from peftlab.model.load import load_tokenizer

    torch.manual_seed(spec["seed"])
    tok = load_tokenizer(MODEL)
    data, groups, stats = _examples_and_batches(spec, tok)
    batches = [data.collate(g) for g in groups]  # one dataset item = one whole batch, in order
    model = _hf_model(spec)
    marks, losses = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=1, max_steps=spec["steps"], learning_rate=spec["lr"],
            lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            adam_beta1=0.9, adam_beta2=0.999, optim="adamw_torch", bf16=spec["precision"] == "bf16",
            use_cpu=True, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, remove_unused_columns=False, seed=spec["seed"],
            gradient_checkpointing=bool(spec.get("gradient_checkpointing")),
        )
        trainer = InOrder(model=model, args=args, train_dataset=batches, data_collator=lambda items: items[0],
                          callbacks=[Clock()])
        trainer.train()
    return {"marks": marks, "losses": losses, "stats": stats}


def worker_gemm(spec: dict) -> dict:
    return {"gemm": gemm_peak(spec["threads"], bf16=spec.get("bf16", True))}


WORKERS = {"peftlab": worker_peftlab, "peft_loop": worker_peft_loop, "peft_trainer": worker_peft_trainer,
           "gemm": worker_gemm}


def worker_main(spec: dict) -> None:
    import torch

    torch.set_num_threads(max(1, spec["threads"]))  # 0: peftlab picks (train.threads=0)
    t0 = time.time()
    out = WORKERS[spec["side"]](spec)
    out["peak_rss_gb"] = round(peak_rss_gb(), 3)
    out["run_s"] = round(time.time() - t0, 1)
    print(json.dumps(out))


# ============================================================================ the driver


def make_init_file(path: Path, seed: int) -> None:
    """peftlab's own LoRA initialisation for this seed (what train() will draw), saved so the
    PEFT sides start from exactly the same factors."""
    from safetensors.torch import save_file

    from peftlab.config import ModelConfig
    from peftlab.methods import lora
    from peftlab.methods.lowrank import lora_layers
    from peftlab.model.load import load_model
    from peftlab.train.runtime import seed_everything

    seed_everything(seed)
    model, _ = load_model(ModelConfig(name=MODEL), seed=seed, with_tokenizer=False)
    seed_everything(seed)
    lora.apply(model, lora.LoRAConfig(r=8, alpha=16, dropout=0.0, targets="all-linear"))
    save_file({p: m.lora_A.weight.detach().contiguous() for p, m in lora_layers(model).items()}, str(path))
    del model


def summarise(run: dict, warmup: int, method: str, peak: float) -> dict:
    marks, stats = run["marks"], run["stats"]
    assert len(marks) == len(stats), (len(marks), len(stats))
    dt = marks[-1] - marks[warmup - 1]
    timed = stats[warmup:]
    tok = sum(s["tokens"] for s in timed)
    lab = sum(s["labels"] for s in timed)
    pairs = sum(s["pairs"] for s in timed)
    out = {"tok_s": tok / dt, "label_tok_s": lab / dt, "rss": run["peak_rss_gb"], "step_s": dt / len(timed)}
    if "shapes" in run:
        out["flops"] = useful_flops(run["shapes"], method, run["lora_params"], tok, lab, pairs) / dt
        out["mfu"] = out["flops"] / (peak * 1e9)
    return out


def run_suite(name: str, variants: dict[str, dict], args, tmp: Path, peak_key: str) -> dict:
    """Run every variant ``args.repeats`` times, alternating; returns per-variant medians."""
    if args.only:
        variants = {k: v for k, v in variants.items() if re.search(args.only, k)}
    results: dict[str, list] = {k: [] for k in variants}
    order = alternate(list(variants), args.repeats)
    gemm = [run_worker(Path(__file__), {"side": "gemm", "threads": args.threads, "name": "gemm",
                                                "bf16": peak_key.startswith("bfloat16")})["gemm"]]
    for i, key in enumerate(order):
        spec = variants[key]
        env = spec.get("env")
        spec = {k: v for k, v in spec.items() if k != "env"}
        hog = None
        if spec.get("hog"):  # a neighbour that keeps one core busy for the whole run
            wait_quiet(args.wait_idle)
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            r = run_worker(Path(__file__), {**spec, "name": key}, env, wait=0 if hog else args.wait_idle)
        except RuntimeError as e:  # one broken variant must not cost the others' figures
            print(f"[{name}] {key}: {e}", file=sys.stderr)
            continue
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
        results[key].append(r)
        print(f"[{name}] {i + 1}/{len(order)} {key}: {r['wall_s']} s, rss {r['peak_rss_gb']} GB, "
              f"busy cores before {r['busy_cores_before']}", file=sys.stderr)
    gemm.append(run_worker(Path(__file__), {"side": "gemm", "threads": args.threads, "name": "gemm",
                                                "bf16": peak_key.startswith("bfloat16")})["gemm"])
    peak = max(g[peak_key] for g in gemm)
    shapes = next((r for rs in results.values() for r in rs if "shapes" in r), None)
    summary = {"gemm": gemm, "peak_gflops": peak, "peak_key": peak_key, "variants": {}}
    for key, runs in results.items():
        spec = variants[key]
        if not runs:
            continue
        per = []
        for r in runs:
            if "shapes" not in r and shapes is not None:
                r = {**r, "shapes": shapes["shapes"], "lora_params": shapes["lora_params"]}
            per.append(summarise(r, args.warmup, spec["method"], peak))
        # best of repeats, step by step: every run trains on the same batches, so the fastest
        # time of step i over the repeats is the one least disturbed by neighbours
        steps = [min(r["marks"][i] - r["marks"][i - 1] for r in runs) for i in range(args.warmup, len(runs[0]["marks"]))]
        timed = runs[0]["stats"][args.warmup:]
        best = sum(st["tokens"] for st in timed) / sum(steps)
        summary["variants"][key] = {
            "best_tok_s": best, "marks": [r["marks"] for r in runs],
            "tok_s": median([p["tok_s"] for p in per]), "label_tok_s": median([p["label_tok_s"] for p in per]),
            "rss": median([p["rss"] for p in per]), "mfu": median([p.get("mfu") for p in per]),
            "step_s": median([p["step_s"] for p in per]), "tok_s_runs": [round(p["tok_s"], 1) for p in per],
            "losses": runs[0]["losses"],
        }
    return summary


def loss_agreement(summary: dict, a: str, b: str) -> float:
    if a not in summary["variants"] or b not in summary["variants"]:
        return float("nan")
    la, lb = summary["variants"][a]["losses"], summary["variants"][b]["losses"]
    return max(abs(x - y) for x, y in zip(la, lb))


def print_suite(title: str, summary: dict, anchor: str) -> str:
    v = summary["variants"]
    base = v.get(anchor) or next(iter(v.values()))
    rows = []
    for key, s in v.items():
        rows.append([key, f"{s['tok_s']:.0f}", f"{s['label_tok_s']:.0f}", f"{s['tok_s'] / base['tok_s']:.2f}x",
                     f"{s['best_tok_s']:.0f}", f"{s['best_tok_s'] / base['best_tok_s']:.2f}x",
                     f"{s['rss']:.2f}", f"{s['rss'] / base['rss']:.2f}x",
                     f"{s['mfu']:.2f}" if s["mfu"] is not None else "", f"{s['step_s']:.2f}",
                     " ".join(map(str, s["tok_s_runs"]))])
    text = (f"\n## {title}\nGEMM peak ({summary['peak_key']}): {summary['peak_gflops']} GFLOP/s "
            f"(all: {summary['gemm']})\n\n"
            + fmt_table(rows, ["variant", "tokens/s", "label tok/s", f"vs {anchor}", "best-of tok/s",
                               "best-of vs", "peak RSS GB",
                               f"RSS vs {anchor}", "MFU", "s/step", "tokens/s per repeat"]))
    print(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--suite", default="main",
                    help="comma list of: main (SFT data, 3 sides), fixed (fixed-length 512 rows), "
                         "ablation (each peftlab lever on its own), full (full fine-tuning), "
                         "fp32 (loss agreement in fp32), threads (busy neighbour), packed (peftlab with "
                         "data.packing and memory options vs PEFT + Trainer), malloc (allocators), "
                         "short (builtin:tasks rows at --short-batch: peftlab with and without train.unpad "
                         "vs both PEFT sides)")
    ap.add_argument("--short-batch", type=int, default=8, help="batch size of the short suite")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="steps excluded from timing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--compile", action="store_true", help="also measure train.compile (slow cold start)")
    ap.add_argument("--only", help="run only the variants whose name matches this regular expression")
    ap.add_argument("--allocators", action="store_true",
                    help="packed suite: also glibc's MALLOC_MMAP_THRESHOLD_ and torch's THP_MEM_ALLOC_ENABLE")
    ap.add_argument("--json", help="write all figures to this file")
    ap.add_argument("--precision", choices=["auto", "bf16", "no"], default="auto",
                    help="autocast of every side: auto = bf16 where the CPU has native bf16 (avx512_bf16/amx), "
                         "else float32 (a bf16 GEMM without it runs hundreds of times slower)")
    ap.add_argument("--wait-idle", type=float, default=60.0,
                    help="before each run wait up to this many seconds for other processes to go quiet")
    args = ap.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    if args.warmup < 1 or args.steps <= args.warmup:
        ap.error("need steps > warmup >= 1")
    from peftlab.train.runtime import cpu_has_bf16

    prec = args.precision if args.precision != "auto" else ("bf16" if cpu_has_bf16() else "no")
    peak = "bfloat16_square_2048" if prec == "bf16" else "float32_square_2048"
    label = "bf16" if prec == "bf16" else "float32"
    tmp = Path(tempfile.mkdtemp(prefix="peftlab-bench-"))
    init = tmp / "lora_init.safetensors"
    seed = 42
    make_init_file(init, seed)
    common = {"method": "lora", "steps": args.steps, "batch_size": args.batch_size, "seed": seed, "lr": 2e-4,
              "precision": prec, "threads": args.threads, "init_file": str(init), "data": sft_data()}
    sides = {"peftlab": {**common, "side": "peftlab"}, "peft_trainer": {**common, "side": "peft_trainer"},
             "peft_loop": {**common, "side": "peft_loop"}}
    report, figures = [], {}
    suites = args.suite.split(",")
    print(f"precision {label} (native bf16: {cpu_has_bf16()}); torch threads {args.threads}; steps {args.steps} "
          f"(first {args.warmup} untimed); "
          f"repeats {args.repeats}; batch {args.batch_size}", file=sys.stderr)

    def check_losses(s, tol_floor):
        d_ours = loss_agreement(s, "peftlab", "peft_loop")
        d_peers = loss_agreement(s, "peft_trainer", "peft_loop")
        tol = max(tol_floor, 2 * d_peers)
        ok = d_ours <= tol
        line = (f"loss curves: max |peftlab - peft_loop| = {d_ours:.4f}; max |peft_trainer - peft_loop| = "
                f"{d_peers:.4f}; tolerance {tol:.4f} -> {'AGREE' if ok else 'DISAGREE'}")
        print(line)
        report.append(line)
        return ok

    if "main" in suites:
        s = run_suite("main", sides, args, tmp, peak)
        report.append(print_suite("SFT data (alpaca_en_demo, chat template), LoRA r=8, " + label, s, "peft_trainer"))
        check_losses(s, 0.03)
        figures["main"] = s
    if "fixed" in suites:
        fx = {k: {**v, "data": fixed_data(tmp)} for k, v in sides.items()}
        s = run_suite("fixed", fx, args, tmp, peak)
        report.append(print_suite("fixed-length 512-token rows (pre-packed), LoRA r=8, " + label, s, "peft_trainer"))
        check_losses(s, 0.03)
        figures["fixed"] = s
    if "fp32" in suites:
        f32 = {k: {**v, "precision": "no", "steps": 6, "batch_size": 2} for k, v in sides.items()}
        s = run_suite("fp32", f32, argparse.Namespace(**{**vars(args), "repeats": 1, "warmup": 1}), tmp,
                      "float32_square_2048")
        report.append(print_suite("fp32 loss agreement run (6 steps, batch 2)", s, "peft_trainer"))
        check_losses(s, 2e-3)
        figures["fp32"] = s
    if "ablation" in suites:
        pl = sides["peftlab"]
        ab = {"peftlab (all levers)": pl,
              "- fused loss": {**pl, "overrides": ["train.fused_loss=false"]},
              "- fast LoRA function": {**pl, "overrides": ["train.fast_lora=false"]},
              "- unpad": {**pl, "overrides": ["train.unpad=false"]},
              "- both": {**pl, "overrides": ["train.fused_loss=false", "train.fast_lora=false"]},
              "fp32 (no autocast)": {**pl, "precision": "no"},
              "+ gradient checkpointing": {**pl, "overrides": ["model.gradient_checkpointing=true"]},
              "MALLOC_ARENA_MAX=1": {**pl, "env": {"MALLOC_ARENA_MAX": "1"}}}
        if Path(JEMALLOC).exists():
            ab["jemalloc (LD_PRELOAD)"] = {**pl, "env": {"LD_PRELOAD": JEMALLOC}}
        try:
            import peftlab.data.packing  # noqa: F401

            ab["+ packing"] = {**pl, "overrides": ["data.packing=true"], "packing": True}
        except ImportError:
            report.append("packing: not available in this checkout (peftlab.data.packing missing)")
        if args.compile:
            ab["+ torch.compile"] = {**pl, "overrides": ["train.compile=true"]}
        s = run_suite("ablation", ab, args, tmp, peak)
        report.append(print_suite("ablation: each lever on its own (SFT data, LoRA r=8)", s, "peftlab (all levers)"))
        figures["ablation"] = s
    if "malloc" in suites:
        pl, tr = sides["peftlab"], sides["peft_trainer"]
        ma = {"peftlab": pl, "peftlab, MALLOC_MMAP_THRESHOLD_=65536": {**pl, "env": {"MALLOC_MMAP_THRESHOLD_": "65536"}},
              "peftlab, MALLOC_ARENA_MAX=1": {**pl, "env": {"MALLOC_ARENA_MAX": "1"}},
              "peft_trainer": tr}
        if Path(JEMALLOC).exists():
            ma["peftlab, jemalloc"] = {**pl, "env": {"LD_PRELOAD": JEMALLOC}}
            ma["peft_trainer, jemalloc"] = {**tr, "env": {"LD_PRELOAD": JEMALLOC}}
        s = run_suite("malloc", ma, args, tmp, peak)
        report.append(print_suite(f"allocators: glibc tunables and jemalloc (SFT data, LoRA r=8, {label})", s,
                                  "peft_trainer"))
        figures["malloc"] = s
    if "packed" in suites:
        # the default SFT benchmark as a user runs it: packing on (peftlab), memory options beside
        pl, tr = sides["peftlab"], sides["peft_trainer"]
        packed = {**pl, "overrides": ["data.packing=true"], "packing": True}
        ckpt = {**packed, "overrides": ["data.packing=true", "model.gradient_checkpointing=true"]}
        half = {**packed, "overrides": [*ckpt["overrides"], "model.checkpoint_layers=0.5"]}
        pk = {"peftlab (padded)": pl, "peftlab (packed)": packed, "peftlab (packed), gradient checkpointing": ckpt,
              "peftlab (packed), gradient checkpointing on half the layers": half,
              "peft_trainer": tr,
              # not the same math as the other rows: the residual stream and norms run in bf16 too
              "peftlab (packed), model.dtype=bfloat16": {**packed, "overrides": ["data.packing=true",
                                                                                  "model.dtype=bfloat16"]}}
        if args.allocators:  # measured once (results/train_packed_8steps.txt): both lost to plain glibc
            pk["peftlab (packed), MALLOC_MMAP_THRESHOLD_=4194304"] = {
                **packed, "env": {"MALLOC_MMAP_THRESHOLD_": "4194304"}}
            pk["peftlab (packed), THP_MEM_ALLOC_ENABLE=1"] = {**packed, "env": {"THP_MEM_ALLOC_ENABLE": "1"}}
        if Path(JEMALLOC).exists():
            pk["peftlab (packed), jemalloc"] = {**packed, "env": {"LD_PRELOAD": JEMALLOC}}
            pk["peftlab (packed), gradient checkpointing, jemalloc"] = {**ckpt, "env": {"LD_PRELOAD": JEMALLOC}}
        s = run_suite("packed", pk, args, tmp, peak)
        report.append(print_suite("SFT data with packing (peftlab) vs padded batches (PEFT + Trainer), LoRA r=8, "
                                  + label, s, "peft_trainer"))
        figures["packed"] = s
    if "short" in suites:
        sh = {k: {**v, "data": short_data(), "batch_size": args.short_batch} for k, v in sides.items()}
        sh = {"peftlab": sh["peftlab"], "peftlab, train.unpad=false": {**sh["peftlab"], "overrides": ["train.unpad=false"]},
              "peft_trainer": sh["peft_trainer"], "peft_loop": sh["peft_loop"]}
        s = run_suite("short", sh, args, tmp, peak)
        report.append(print_suite(f"short rows (builtin:tasks, batch {args.short_batch}), LoRA r=8, " + label, s,
                                  "peft_loop"))
        check_losses(s, 0.03)
        figures["short"] = s
    if "threads" in suites:
        pl = sides["peftlab"]
        th = {f"threads={n}{' (auto)' if n == 0 else ''}, one core busy": {**pl, "threads": n, "hog": True}
              for n in (1, 2, 0)}
        th["threads=2, quiet"] = {**pl, "threads": 2}
        s = run_suite("threads", th, args, tmp, peak)
        report.append(print_suite("threads: a neighbour process spinning on one of the 2 cores", s,
                                  "threads=2, quiet"))
        figures["threads"] = s
    if "full" in suites:
        full = {k: {**v, "method": "full"} for k, v in sides.items()}
        s = run_suite("full", full, args, tmp, peak)
        report.append(print_suite(f"full fine-tuning (SFT data, {label})", s, "peft_trainer"))
        check_losses(s, 0.05)
        figures["full"] = s
    if "main" in figures:
        m = figures["main"]["variants"]
        speed = m["peftlab"]["tok_s"] / m["peft_trainer"]["tok_s"]
        mem = m["peftlab"]["rss"] / m["peft_trainer"]["rss"]
        goal = (f"\nGOALS (SFT data): speed {speed:.2f}x PEFT+Trainer (floor 1.5x, aim 2x) -> "
                f"{'met' if speed >= 1.5 else 'NOT met'}; peak RSS {mem:.2f}x (floor <= 0.6x, aim 0.5x) -> "
                f"{'met' if mem <= 0.6 else 'NOT met'}; MFU {m['peftlab']['mfu']:.2f} (aim 0.6)")
        if "fixed" in figures:
            f = figures["fixed"]["variants"]
            goal += (f"\nGOALS (fixed-length): speed {f['peftlab']['tok_s'] / f['peft_trainer']['tok_s']:.2f}x "
                     f"(aim 1.3x); MFU {f['peftlab']['mfu']:.2f}")
    if "packed" in figures:
        v = figures["packed"]["variants"]
        tr = v["peft_trainer"]
        lines = [f"\nGOALS (SFT data, peftlab with packing) vs PEFT+Trainer {tr['tok_s']:.0f} tok/s, {tr['rss']:.2f} GB:"]
        for key, s in v.items():
            if key.startswith("peftlab"):
                sp, mem = s["tok_s"] / tr["tok_s"], s["rss"] / tr["rss"]
                lines.append(f"  {key}: speed {sp:.2f}x (floor 1.5x) {'met' if sp >= 1.5 else 'NOT met'}; "
                             f"peak RSS {mem:.2f}x (floor 0.6x) {'met' if mem <= 0.6 else 'NOT met'}; MFU {s['mfu']:.2f}")
        goal = (goal + "\n" if "main" in figures else "") + "\n".join(lines)
    if "main" in figures or "packed" in figures:
        print(goal)
        report.append(goal)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "figures": figures, "report": report}, indent=1))


if __name__ == "__main__":
    main()
