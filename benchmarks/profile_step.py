"""Where one training step's time goes: torch.profiler over peftlab's or HF PEFT's step.

    flock /work/heavy.lock python benchmarks/profile_step.py --side peftlab --threads 2

Same model, data and batch as train_throughput.py (smollm2-135m, LoRA r=8 all-linear, 4
alpaca_en_demo examples padded to the longest, bf16 autocast). Prints the top operators by
self CPU time and a grouping into GEMMs, attention, loss, elementwise and the rest.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

GROUPS = {
    "GEMM (mm/addmm/bmm/linear)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul",
                                   "mkldnn", "aten::_addmm_activation"),
    "attention (SDPA)": ("flash_attention", "scaled_dot_product", "_efficient_attention", "attention"),
    "loss (log_softmax/CE/logsumexp)": ("log_softmax", "nll_loss", "cross_entropy", "logsumexp",
                                        "_log_softmax"),
    "casts/copies": ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", default="peftlab", choices=["peftlab", "peft"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "no"],
                    help="auto: bf16 autocast where the CPU has native bf16, else float32")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--overrides", default="", help="peftlab train.* toggles, comma separated key=value")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    from train_throughput import MODEL, sft_data

    from peftlab.configure import load_config
    from peftlab.data.dataset import build_datasets
    from peftlab.data.sampler import BatchSampler
    from peftlab.model.load import load_model
    from peftlab.train.loss import causal_lm_loss
    from peftlab.train.step import apply_speed_options

    torch.set_num_threads(args.threads)
    ov = [f"data.{k}={v}" for k, v in sft_data().items()] + ["data.eval_split=0", f"model.name={MODEL}"]
    ov += [o for o in args.overrides.split(",") if o]
    cfg = load_config(None, ov)
    model, tok = load_model(cfg.model)
    data = build_datasets(cfg.data, tok, 42)
    sampler = BatchSampler(len(data.train), 4, 42, True)
    batches = [data.collate([data.train[i] for i in sampler.next()]) for _ in range(args.steps + 1)]
    from peftlab.train.runtime import cpu_has_bf16

    amp = args.precision == "bf16" or (args.precision == "auto" and cpu_has_bf16())
    if args.side == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))

        def step(b):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = model(**b).loss
            loss.backward()
    else:
        from peftlab import registry
        from peftlab.methods import lora

        lora.apply(model, cfg.peft)
        speed = apply_speed_options(model, registry.get("lora"), cfg.train)

        def step(b):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss, n = causal_lm_loss(model, b, cfg.train.loss_chunk, cfg.train.fused_loss,
                                         cfg.train.skip_pad_mask, unpad=speed["unpad"])
            (loss / n).backward()
    model.train()
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    step(batches[0])
    opt.step()
    opt.zero_grad()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[1:]:
            step(b)
            opt.step()
            opt.zero_grad(set_to_none=True)
    wall = time.perf_counter() - t0
    widths = [b["input_ids"].shape for b in batches[1:]]
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"side {args.side}, threads {args.threads}, batches {widths}, wall {wall:.2f} s "
          f"(profiled; {wall / args.steps:.2f} s/step)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))
    grouped = {g: 0.0 for g in GROUPS}
    rest = 0.0
    for e in events:
        for g, keys in GROUPS.items():
            if any(k in e.key for k in keys):
                grouped[g] += e.self_cpu_time_total
                break
        else:
            rest += e.self_cpu_time_total
    for g, v in grouped.items():
        print(f"{g:40s} {100 * v / total:5.1f}%")
    print(f"{'everything else':40s} {100 * rest / total:5.1f}%")


if __name__ == "__main__":
    main()
