"""Methods beyond LoRA on the real offline base model: trainable parameters, eval loss, wall time, memory.

    flock /work/heavy.lock env PYTHONPATH=src python benchmarks/methods_beyond.py \
        --out benchmarks/results/methods_beyond.json

Every method trains SmolLM2-135M-Instruct (``smollm2-135m``) on the same data (``builtin:tasks``,
the same 96 held-out examples), the same number of steps, batch size, schedule and seed; only the
method and its learning rate differ. Learning rates are the usual ones for each method (from its
paper or common practice), fixed before running and not tuned on the eval set. LoRA and full
fine-tuning run as references. Each method runs in its own process, so the peak RSS is that
method's; the AdamW state is measured after every optimizer step (a post-step hook) and its
maximum reported — for LISA against full fine-tuning, the memory claim of the paper.

``--steps``/``--methods`` shorten a run; the table is printed as Markdown and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

# method -> (peft.* overrides, learning rate)
METHODS: dict[str, tuple[list[str], float]] = {
    "lora": (["peft.method=lora", "peft.r=8", "peft.alpha=16"], 1e-3),
    "full": (["peft.method=full"], 5e-5),
    "prompt_tuning": (["peft.method=prompt_tuning", "peft.num_virtual_tokens=20", "peft.init=vocab"], 3e-2),
    "p_tuning": (["peft.method=p_tuning", "peft.num_virtual_tokens=20", "peft.encoder=mlp"], 1e-3),
    "prefix_tuning": (["peft.method=prefix_tuning", "peft.num_virtual_tokens=20", "peft.encoder_hidden_size=512"],
                      5e-3),
    "p_tuning_v2": (["peft.method=p_tuning_v2", "peft.num_virtual_tokens=20"], 1e-2),
    # the same prefix methods started from the K/V of real tokens (Li & Liang) instead of PEFT's N(0, 1)
    "prefix_tuning_vocab": (["peft.method=prefix_tuning", "peft.num_virtual_tokens=20",
                             "peft.encoder_hidden_size=512", "peft.init=vocab"], 5e-3),
    "p_tuning_v2_vocab": (["peft.method=p_tuning_v2", "peft.num_virtual_tokens=20", "peft.init=vocab"], 1e-2),
    "mam_vocab": (["peft.method=mam", "peft.num_virtual_tokens=30", "peft.bottleneck=512", "peft.init=vocab"], 1e-3),
    "adapter_serial": (["peft.method=adapter", "peft.placement=serial", "peft.bottleneck=64"], 1e-3),
    "adapter_parallel": (["peft.method=adapter", "peft.placement=parallel", "peft.bottleneck=64",
                          "peft.scaling=4"], 1e-3),
    "mam": (["peft.method=mam", "peft.num_virtual_tokens=30", "peft.bottleneck=512"], 1e-3),
    "ia3": (["peft.method=ia3"], 3e-3),
    "bitfit": (["peft.method=bitfit", "peft.add_biases=true"], 1e-3),
    "lisa": (["peft.method=lisa", "peft.layers=2", "peft.interval=10"], 5e-5),
    "moe_lora": (["peft.method=moe_lora", "peft.r=4", "peft.num_experts=4", "peft.top_k=2"], 1e-3),
    # PEFT's further tuners (issue 19); learning rates fixed before running, not tuned
    "loha": (["peft.method=loha", "peft.r=8", "peft.alpha=8"], 1e-3),
    "lokr": (["peft.method=lokr", "peft.r=8", "peft.alpha=8"], 1e-3),
    "oft": (["peft.method=oft", "peft.block_size=32"], 1e-3),
    "ln_tuning": (["peft.method=ln_tuning"], 1e-3),
    "trainable_tokens": (["peft.method=trainable_tokens", "peft.token_indices=[1,2]"], 1e-3),  # ChatML's two
    "hra": (["peft.method=hra", "peft.r=8"], 1e-3),
    "boft": (["peft.method=boft", "peft.block_size=8", "peft.n_butterfly_factor=2"], 1e-3),
    # FourierFT's ΔW moves ~ scaling·lr/(out·in) per step: a far larger lr than LoRA's (the paper's LLaMA scaling)
    "fourierft": (["peft.method=fourierft", "peft.n_frequency=1000", "peft.scaling=300"], 3e-2),
    "vblora": (["peft.method=vblora", "peft.r=4", "peft.num_vectors=256", "peft.vector_length=64"], 1e-2),
    # issue 18's survey methods, part A; learning rates fixed before running (each family's neighbour's), not tuned
    "krona": (["peft.method=krona", "peft.scale=1"], 1e-3),
    "compacter": (["peft.method=compacter", "peft.bottleneck=64", "peft.phm_dim=4", "peft.phm_rank=1"], 1e-3),
    "mov": (["peft.method=mov", "peft.num_experts=10"], 3e-3),
    "loramoe": (["peft.method=loramoe", "peft.r=4", "peft.num_experts=6", "peft.expert_groups=[3,3]"], 1e-3),
    "chain_lora": (["peft.method=chain_lora", "peft.r=8", "peft.alpha=16", "peft.chain_links=3"], 1e-3),
    "periodic_lora": (["peft.method=periodic_lora", "peft.r=8", "peft.alpha=16", "peft.unload_every=10",
                       "peft.unload_momentum=0.5"], 1e-3),
    # issue 18, survey B: AdapterDrop (the serial adapter without adapters in the lowest n of 30 layers),
    # UniPELT, AdapterFusion (over benchmarks/adapter_fusion_demo.py's codes and zh-numbers adapters, which
    # must exist: run that first), LoRA-drop and LoRA at half the rank (about LoRA-drop's budget)
    "adapter_drop_10": (["peft.method=adapter", "peft.placement=serial", "peft.bottleneck=64",
                         "peft.drop_layers=10"], 1e-3),
    "adapter_drop_20": (["peft.method=adapter", "peft.placement=serial", "peft.bottleneck=64",
                         "peft.drop_layers=20"], 1e-3),
    "unipelt": (["peft.method=unipelt", "peft.r=8", "peft.alpha=16", "peft.bottleneck=64", "peft.num_virtual_tokens=10",
                 "peft.encoder_hidden_size=512", "peft.init=vocab"], 1e-3),
    "adapter_fusion": (["peft.method=adapter_fusion", "peft.adapters=[/tmp/peftlab-bench/adapter_fusion/codes,"
                        "/tmp/peftlab-bench/adapter_fusion/zh-numbers]"], 1e-3),
    "lora_drop": (["peft.method=lora_drop", "peft.r=8", "peft.alpha=16", "peft.warmup_steps=10",
                   "peft.threshold=0.9"], 1e-3),
    "lora_r4": (["peft.method=lora", "peft.r=4", "peft.alpha=8"], 1e-3),
    # issue 19's LoRA inits: plain LoRA's settings and lr, only peft.init differs (8 init batches by default);
    # LoftQ beside QLoRA (plain LoRA on the same NF4 base)
    "lora_eva": (["peft.method=lora", "peft.r=8", "peft.alpha=16", "peft.init=eva"], 1e-3),
    "lora_corda_ipm": (["peft.method=lora", "peft.r=8", "peft.alpha=16", "peft.init=corda_ipm"], 1e-3),
    "lora_corda_kpm": (["peft.method=lora", "peft.r=8", "peft.alpha=16", "peft.init=corda_kpm"], 1e-3),
    "lora_ga": (["peft.method=lora", "peft.r=8", "peft.alpha=16", "peft.init=lora_ga"], 1e-3),
    "qlora": (["peft.method=lora", "peft.r=8", "peft.alpha=16", "model.quantize=nf4"], 1e-3),
    "lora_loftq": (["peft.method=lora", "peft.r=8", "peft.alpha=16", "peft.init=loftq", "peft.loftq_iter=5",
                    "model.quantize=nf4"], 1e-3),
}


def common(steps: int, out_dir: str) -> list[str]:
    return ["model.name=smollm2-135m", "data.path=builtin:tasks", "data.eval_split=96", "data.max_length=128",
            f"train.steps={steps}", "train.batch_size=8", "train.warmup=4", "train.schedule=cosine",
            "train.eval_every=0", "train.eval_batches=12", "train.seed=42", "train.progress=false",
            "train.overwrite=true", f"train.output_dir={out_dir}"]


def run_one(name: str, steps: int, out_dir: str) -> dict:
    """Train one method in this process and measure it."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from peftlab.configure import load_config
    from peftlab.train.loop import train

    peak_state = [0]

    def after_step(optimizer, args, kwargs):
        n = sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
                if torch.is_tensor(t))
        peak_state[0] = max(peak_state[0], n)

    register_optimizer_step_post_hook(after_step)
    overrides, lr = METHODS[name]
    cfg = load_config(None, [*common(steps, out_dir), *overrides, f"train.lr={lr}"])
    started = time.time()
    result = train(cfg)
    wall = time.time() - started
    summary = json.loads((result.run_dir / "summary.json").read_text())
    first = next((m["loss"] for m in result.metrics), None)
    step_s = sorted(m["input_tokens"] / m["tokens_per_s"] for m in result.metrics if m.get("tokens_per_s"))
    return {"median_step_s": round(step_s[len(step_s) // 2], 3) if step_s else None,
            "kept_layers": getattr(cfg.peft, "keep_layers", None),"method": name, "options": " ".join(o.split(".", 1)[1] for o in overrides[1:]), "lr": lr,
            "trainable": summary["trainable"], "total": summary["total"], "eval_loss": result.eval_loss,
            "first_train_loss": first, "last_train_loss": result.metrics[-1]["loss"], "steps": result.steps,
            "wall_s": round(wall, 1), "adamw_state_mb": round(peak_state[0] / 2**20, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def base_eval_loss(out_dir: str) -> float:
    """Eval loss of the untouched base model on the same held-out examples."""
    from peftlab.configure import load_config
    from peftlab.data.dataset import build_datasets
    from peftlab.model.load import load_model
    from peftlab.train.evaluate import evaluate_loss
    from peftlab.train.runtime import resolve_precision

    cfg = load_config(None, [*common(1, out_dir), "peft.method=full"])
    model, tok = load_model(cfg.model)
    data = build_datasets(cfg.data, tok, cfg.train.seed)
    device = next(model.parameters()).device
    return evaluate_loss(model, data.eval, cfg.train.batch_size, data.collate, device,
                         resolve_precision(cfg.train.mixed_precision, device), cfg.train.eval_batches)


def table(rows: list[dict], base: float | None) -> str:
    lines = ["| method | options | lr | trainable | eval loss | wall (s) | AdamW state (MB) | peak RSS (MB) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    if base is not None:
        lines.append(f"| (base model, no training) | | | 0 | {base:.4f} | | | |")
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:60]} | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['options']} | {r['lr']:g} | {r['trainable']:,} | {r['eval_loss']:.4f} | "
                     f"{r['wall_s']} | {r['adamw_state_mb']} | {r['peak_rss_mb']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--out", default="benchmarks/results/methods_beyond.json")
    p.add_argument("--runs", default="/tmp/peftlab-bench/methods_beyond")
    p.add_argument("--skip-base", action="store_true", help="do not measure the untouched base model's eval loss")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method in this process
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, f"{args.runs}/{args.one}")))
        return 0
    if args.one is None and args.methods == "base":
        print(base_eval_loss(f"{args.runs}/base"))
        return 0
    rows = []
    started = time.time()
    base = None if args.skip_base else float(subprocess.run(
        [sys.executable, __file__, "--methods", "base", "--runs", args.runs],
        capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    for name in args.methods.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps),
                               "--runs", args.runs], capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"method": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "?"})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "flock /work/heavy.lock env PYTHONPATH=src python benchmarks/methods_beyond.py " + " ".join(sys.argv[1:])
    out.write_text(json.dumps({"command": command, "steps": args.steps, "base_eval_loss": base, "rows": rows,
                               "total_wall_s": round(time.time() - started, 1)}, indent=2))
    print(table(rows, base))
    print(f"\ntotal wall time {time.time() - started:.0f} s; written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
