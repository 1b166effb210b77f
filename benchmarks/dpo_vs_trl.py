"""peftlab's DPO against TRL's DPOTrainer with PEFT: the same pairs, model, LoRA and batch.

    python benchmarks/dpo_vs_trl.py [--steps 6] [--pairs-file PATH] [--out FILE.json]

Both sides train SmolLM2-135M-Instruct with LoRA r=8, alpha 16, dropout 0 on every linear layer
of the decoder (PEFT's ``all-linear``; peftlab's), DPO sigmoid loss with beta 0.1, AdamW lr 5e-4,
2 pairs per step, fp32, no gradient checkpointing, one CPU thread, the reference being the model
with its adapter switched off (PEFT's ``disable_adapter``; peftlab's ``adapter_off``). The pairs
are the first ones of ``dpo_en_demo.json`` whose prompt + longer answer fit in 192 tokens under
the chat template, so neither side truncates and both see the same text.

Each side runs in its own subprocess (its own peak RSS), one after the other, ``--repeats`` times
alternating. Useful tokens/s: the non-padding tokens of the policy's batches (prompt + answer of
both rows of every pair, what TRL logs as ``num_tokens``) per second of wall time, per step over
steps 2..N (step 1 warms up); the summary gives the median over steps and repeats (a busy
neighbour slows some steps), the overall mean and the best step. Peak RSS: the worker process's
maximum resident set size (GB), model load included.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT, peak_rss_gb, side_by_side  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "dpo_en_demo.json"
MAX_LENGTH, BATCH, LR, BETA, RANK = 192, 2, 5e-4, 0.1, 8


def select_pairs(n: int) -> list[dict]:
    """The first ``n`` demo pairs that fit MAX_LENGTH untruncated, as prompt/chosen/rejected messages."""
    from peftlab.config import DataConfig
    from peftlab.data.dataset import make_encoder
    from peftlab.data.formats import parse_record
    from peftlab.data.preference import encode_pair
    from peftlab.model.load import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    cfg = DataConfig(max_length=10**6)
    enc = make_encoder(DataConfig(template="auto"), tok)
    out = []
    for i, rec in enumerate(json.loads(DATA.read_text())):
        pair = parse_record(rec, f"record {i}")
        ex = encode_pair(pair, enc, cfg)
        if len(pair.prompt) == 1 and len(ex) <= MAX_LENGTH:
            out.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} demo pairs fit {MAX_LENGTH} tokens")


def run_peftlab(spec: dict) -> dict:
    import torch

    from peftlab.configure import load_config
    from peftlab.train.loop import train

    torch.set_num_threads(1)
    out = tempfile.mkdtemp()
    cfg = load_config(None, [
        "model.name=smollm2-135m", "peft.method=lora", f"peft.r={RANK}", "peft.alpha=16", "peft.dropout=0",
        "peft.targets=all-linear", f"data.path={spec['data']}", "data.eval_split=0", f"data.max_length={MAX_LENGTH}",
        "data.shuffle=false", "train.objective=dpo", f"pref.beta={BETA}", "pref.reference=adapter_off",
        f"train.steps={spec['steps']}", f"train.batch_size={BATCH}", f"train.lr={LR}", "train.warmup=0",
        "train.schedule=constant", "train.eval_every=0", "train.save_every=0", "train.threads=1",
        "train.mixed_precision=no", "train.progress=false", f"train.output_dir={out}"])
    times = []
    t = [time.perf_counter()]

    def on_step(rec):
        now = time.perf_counter()
        times.append(now - t[0])
        t[0] = now

    result = train(cfg, callbacks=[on_step])
    tokens = [r["input_tokens"] for r in result.metrics]  # non-padding tokens of the step's rows
    return {"side": "peftlab", "step_s": times, "tokens": tokens, "loss": [r["loss"] for r in result.metrics],
            "peak_rss_gb": round(peak_rss_gb(), 3)}


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from peftlab.config import ModelConfig
    from peftlab.model.load import load_model

    torch.set_num_threads(1)
    model, tok = load_model(ModelConfig(name="smollm2-135m"))
    pairs = json.loads(Path(spec["data"]).read_text())
    ds = Dataset.from_list([{k: [{"role": m["role"], "content": m["content"]} for m in p[k]]
                             for k in ("prompt", "chosen", "rejected")} for p in pairs])
    args = DPOConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, bf16=False, fp16=False,
                     per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, learning_rate=LR,
                     lr_scheduler_type="constant", warmup_steps=0, max_steps=spec["steps"], beta=BETA,
                     loss_type=["sigmoid"], max_length=None, gradient_checkpointing=False, logging_steps=1,
                     save_strategy="no", dataloader_num_workers=0, seed=42, disable_tqdm=True)
    peft_cfg = LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_cfg,
                         callbacks=[Clock()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "num_tokens" in h]
    seen = [0] + [int(h["num_tokens"]) for h in logs]
    tokens = [b - a for a, b in zip(seen, seen[1:])]
    return {"side": "trl", "step_s": times, "tokens": tokens, "loss": [h["loss"] for h in logs if "loss" in h],
            "peak_rss_gb": round(peak_rss_gb(), 3)}


def summary(results: list[dict]) -> dict:
    """Per side: the median over every measured step (2..N of every repeat) of that step's tokens/s
    (robust to a neighbour that loads the machine for part of a run), the mean over the steps, the
    best step's, and the largest peak RSS."""
    import statistics

    out = {}
    for side in ("peftlab", "trl"):
        runs = [r for r in results if r["side"] == side]
        per_step = [t / s for r in runs for t, s in zip(r["tokens"][1:], r["step_s"][1:])]
        out[side] = {"tokens_per_s_median": round(statistics.median(per_step), 1),
                     "tokens_per_s_mean": round(sum(sum(r["tokens"][1:]) for r in runs)
                                                / sum(sum(r["step_s"][1:]) for r in runs), 1),
                     "tokens_per_s_best_step": round(max(per_step), 1),
                     "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
                     "tokens_per_step": round(sum(runs[0]["tokens"]) / len(runs[0]["tokens"]))}
    for key in ("median", "mean", "best_step"):
        out[f"speedup_{key}"] = round(out["peftlab"][f"tokens_per_s_{key}"] / out["trl"][f"tokens_per_s_{key}"], 2)
    out["memory_ratio"] = round(out["peftlab"]["peak_rss_gb"] / out["trl"]["peak_rss_gb"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dpo_vs_trl.json"))
    p.add_argument("--worker")
    a = p.parse_args()
    if a.worker:
        spec = json.loads(a.worker)
        print(json.dumps(run_peftlab(spec) if spec["name"] == "peftlab" else run_trl(spec)))
        return
    data = Path(tempfile.mkdtemp()) / "pairs.json"
    data.write_text(json.dumps(select_pairs(a.steps * BATCH)))
    side_by_side(Path(__file__), lambda name: {"name": name, "data": str(data), "steps": a.steps}, a.repeats,
                 ("step_s", "tokens", "peak_rss_gb"), summary,
                 {"model": "smollm2-135m", "lora": f"r={RANK} alpha=16 all-linear", "batch_pairs": BATCH,
                  "steps": a.steps, "max_length": MAX_LENGTH, "dtype": "float32", "threads": 1}, a.out)

if __name__ == "__main__":
    main()
