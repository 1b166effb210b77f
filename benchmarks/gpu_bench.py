"""Training throughput and peak GPU memory: peftlab vs HF PEFT + Trainer on a 1B-class Llama shape.

    python benchmarks/gpu_bench.py --device cuda --out DIR          # on a GPU (benchmarks/gpu_check.sh)
    python benchmarks/gpu_bench.py --device cpu --tiny --out DIR    # dry run: the same code, a tiny shape

Model: a randomly initialised Llama with Llama-3.2-1B's shape (16 layers, hidden 2048, MLP 8192,
32 heads, 8 KV heads, vocabulary 128,256, tied embeddings; 1.24 B parameters), fp32 master
weights, bf16 autocast on CUDA (fp32 in the CPU dry run). Method: LoRA r=16, alpha 32, dropout 0,
on all linear layers (q, k, v, o, gate, up, down). Data: the same random token batches on both
sides (batch x length tokens, every token a label), AdamW lr 2e-4, clip 1.0.

Sides, each in its own subprocess (a fresh CUDA context, so peak memory is the side's own),
alternating within every repeat (the harness of benchmarks/train_throughput.py, _bench.py):
  peftlab       start_training + train_step: the optimiser step peftlab's loop runs, speed levers
                at their defaults (the loop around it only logs, evaluates and checkpoints)
  peft_trainer  HF PEFT + transformers Trainer (bf16=True on CUDA), default optimiser

Figures: tokens/s = tokens per step / median step time after ``--warmup`` steps (CUDA-synchronised);
peak memory = torch.cuda.max_memory_allocated (CUDA) or the worker's peak RSS (CPU dry run);
the first and last losses of each side (both start near ln(128256) = 11.76 on random data).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import alternate, fmt_table, median, peak_rss_gb, run_worker  # noqa: E402

LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 4096,
            "tie_word_embeddings": True, "rope_theta": 500000.0}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 256, "tie_word_embeddings": True}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(spec: dict) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(spec["seed"])
    out = []
    for _ in range(spec["steps"]):
        ids = torch.randint(0, spec["shape"]["vocab_size"], (spec["batch_size"], spec["length"]), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def worker_peftlab(spec: dict) -> dict:
    import torch

    from peftlab import registry
    from peftlab.config import Config, ModelConfig, TrainConfig, build_dataclass
    from peftlab.model.load import load_model
    from peftlab.train.step import start_training, train_step

    mcfg = ModelConfig(name="config:llama", config_overrides=dict(spec["shape"]), device=spec["device"],
                       seed=spec["seed"])
    model, _ = load_model(mcfg, with_tokenizer=False)
    model.config.use_cache = False
    method = registry.get("lora")
    peft = build_dataclass(method.config_cls, {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0,
                                               "targets": TARGETS}, "peft")
    torch.manual_seed(spec["seed"])
    method.apply(model, peft)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    cfg = Config(peft=peft, train=TrainConfig(lr=2e-4, warmup=0, schedule="constant", max_grad_norm=1.0,
                                              weight_decay=0.0, mixed_precision=spec["precision"]))
    state = start_training(model, cfg, total_steps=spec["steps"])
    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    marks, losses = [], []
    sync(spec["device"])
    marks.append(time.perf_counter())
    for b in batches(spec):
        record = train_step(state, [b])
        sync(spec["device"])
        marks.append(time.perf_counter())
        losses.append(None if record is None else record["loss"])
    return {"marks": marks, "losses": losses, "trainable": trainable, "total": total}


def worker_peft_trainer(spec: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(LlamaConfig(**spec["shape"]), dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    data = batches(spec)
    marks, losses = [], []
    on_cuda = spec["device"] == "cuda"

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if on_cuda:
                torch.cuda.reset_peak_memory_stats()
            sync(spec["device"])
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            sync(spec["device"])
            marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=1, max_steps=spec["steps"], learning_rate=2e-4,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            bf16=spec["precision"] == "bf16", use_cpu=not on_cuda, logging_steps=1, save_strategy="no",
            report_to="none", disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
            seed=spec["seed"],
        )
        trainer = InOrder(model=model, args=args, train_dataset=data, data_collator=lambda items: items[0],
                          callbacks=[Clock()])
        trainer.train()
    return {"marks": marks, "losses": losses, "trainable": trainable, "total": total}


WORKERS = {"peftlab": worker_peftlab, "peft_trainer": worker_peft_trainer}


def worker_main(spec: dict) -> None:
    import torch

    if spec["device"] == "cpu":
        torch.set_num_threads(max(1, spec["threads"]))
    t0 = time.time()
    out = WORKERS[spec["side"]](spec)
    if spec["device"] == "cuda":
        out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        out["device_name"] = torch.cuda.get_device_name()
    out["peak_rss_gb"] = round(peak_rss_gb(), 3)
    out["run_s"] = round(time.time() - t0, 1)
    print(json.dumps(out))


def summarise(run: dict, spec: dict) -> dict:
    steps = [b - a for a, b in zip(run["marks"], run["marks"][1:])][spec["warmup"]:]
    tokens = spec["batch_size"] * spec["length"]
    step_s = median(steps)
    losses = [x for x in run["losses"] if x is not None]
    return {"tokens_per_s": round(tokens / step_s, 1) if step_s else None, "step_s": round(step_s, 4),
            "peak_gpu_gb": run.get("peak_gpu_gb"), "peak_rss_gb": run["peak_rss_gb"],
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "trainable": run["trainable"], "total": run["total"], "device_name": run.get("device_name")}


def _r(x):
    return None if x is None else round(x, 4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model instead of the 1B shape (dry run)")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps per side (default 12; tiny 4)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (default 3; tiny 1)")
    ap.add_argument("--batch-size", type=int, default=None, help="rows per step (default 4; tiny 2)")
    ap.add_argument("--length", type=int, default=None, help="tokens per row (default 1024; tiny 64)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (dry run)")
    ap.add_argument("--out", type=Path, help="write gpu_bench.json and gpu_bench.md here")
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    tiny = args.tiny
    spec = {"device": args.device, "shape": TINY if tiny else LLAMA_1B, "seed": 0, "threads": args.threads,
            "steps": args.steps or (4 if tiny else 12), "warmup": args.warmup if args.warmup is not None else
            (1 if tiny else 3), "batch_size": args.batch_size or (2 if tiny else 4),
            "length": args.length or (64 if tiny else 1024),
            "precision": "bf16" if args.device == "cuda" else "no"}
    script = Path(__file__).resolve()
    runs: dict[str, list[dict]] = {"peftlab": [], "peft_trainer": []}
    for side in alternate(list(runs), args.repeats):
        print(f"running {side} ...", file=sys.stderr, flush=True)
        raw = run_worker(script, {**spec, "side": side, "name": side}, timeout=900)
        runs[side].append(summarise(raw, spec))
    rows, result = [], {"spec": spec, "sides": {}}
    for side, rs in runs.items():
        best = {k: median([r[k] for r in rs]) for k in ("tokens_per_s", "peak_gpu_gb", "peak_rss_gb")}
        result["sides"][side] = {**rs[-1], **best, "runs": rs}
    base = result["sides"]["peft_trainer"]
    mem_key = "peak_gpu_gb" if args.device == "cuda" else "peak_rss_gb"
    for side, s in result["sides"].items():
        speed = s["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None
        mem = s[mem_key] / base[mem_key] if base[mem_key] else None
        rows.append([side, s["tokens_per_s"], f"{speed:.2f}x" if speed else "", s[mem_key],
                     f"{mem:.2f}x" if mem else "", _r(s["first_loss"]), _r(s["last_loss"]), f"{s['trainable']:,}"])
    device_name = base.get("device_name") or "CPU (dry run)"
    shape = "tiny Llama (dry run)" if tiny else "Llama-3.2-1B shape, random init"
    table = fmt_table(rows, ["side", "tokens/s", "vs Trainer", mem_key.replace("_", " "), "vs Trainer",
                             "first loss", "last loss", "trainable"])
    text = (f"{shape}; LoRA r=16 all linear; batch {spec['batch_size']} x {spec['length']} tokens; "
            f"{spec['steps']} steps ({spec['warmup']} warm-up); {spec['precision']}; device: {device_name}\n\n{table}\n")
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_bench.json").write_text(json.dumps(result, indent=2))
        (args.out / "gpu_bench.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
