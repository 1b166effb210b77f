"""peftlab's GRPO against TRL's GRPOTrainer with PEFT: the same prompts, model, LoRA, group and lengths.

    python benchmarks/grpo_vs_trl.py [--steps 5] [--repeats 1] [--out FILE.json]

Both sides train SmolLM2-135M-Instruct with LoRA r=8, alpha 16, dropout 0 on every linear layer
(PEFT's ``all-linear``), GRPO with loss_type grpo, beta 0 (no reference pass), one policy update
per generation, AdamW lr 5e-4 constant, fp32, one CPU thread; each step samples PROMPTS prompts x
GROUP completions of at most MAX_NEW tokens at temperature 1.0, top-p 1.0, in the training process
with the adapters live (peftlab: its lean KV-cache decoder; TRL without vLLM: ``model.generate``
of the PEFT model), and rewards them by exact match against the answer (whitespace collapsed, the
same function both sides). Prompts: the first ones of ``builtin:tasks`` in order (no shuffling),
rendered with SmolLM2's chat template by each side.

Each side runs in its own subprocess, ``--repeats`` times, alternating. Per step (2..N: step 1
warms up): wall seconds of the whole step (generation, reward, loss, backward, optimiser) and the
completions it sampled. The summary: median completions/s and optimiser steps/hour over the
measured steps of all repeats, and their ratio; the mean completion length of each side (sampling
differs, so the lengths do too: a side whose completions are longer does more work per completion).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT, peak_rss_gb, side_by_side  # noqa: E402

PROMPTS, GROUP, MAX_NEW, LR, RANK = 2, 8, 24, 5e-4, 8


def select_records(n: int) -> list[dict]:
    """The first ``n`` builtin:tasks records: prompt messages and the answer."""
    from peftlab.data.builtin import builtin_conversations

    return [{"prompt": c.messages[:-1], "answer": c.messages[-1]["content"]} for c in builtin_conversations("tasks")[:n]]


def exact(completion: str, answer: str) -> float:
    ws = re.compile(r"\s+")
    return float(ws.sub(" ", completion).strip() == ws.sub(" ", answer).strip())


def run_peftlab(spec: dict) -> dict:
    import torch

    from peftlab.configure import load_config
    from peftlab.train.loop import train

    torch.set_num_threads(1)
    out = tempfile.mkdtemp()
    cfg = load_config(None, [
        "model.name=smollm2-135m", "peft.method=lora", f"peft.r={RANK}", "peft.alpha=16", "peft.dropout=0",
        "peft.targets=all-linear", f"data.path={spec['data']}", "data.eval_split=0", "data.shuffle=false",
        "train.objective=grpo", f"grpo.num_generations={GROUP}", f"grpo.max_completion_length={MAX_NEW}",
        "grpo.temperature=1.0", "grpo.beta=0", "grpo.loss_type=grpo", "grpo.rewards=[exact_match]",
        f"train.steps={spec['steps']}", f"train.batch_size={PROMPTS}", f"train.lr={LR}", "train.warmup=0",
        "train.schedule=constant", "train.eval_every=0", "train.save_every=0", "train.threads=1",
        "train.mixed_precision=no", "train.progress=false", f"train.output_dir={out}"])
    times, t = [], [time.perf_counter()]

    def on_step(rec):
        now = time.perf_counter()
        times.append(now - t[0])
        t[0] = now

    result = train(cfg, callbacks=[on_step])
    return {"side": "peftlab", "step_s": times, "completions": [PROMPTS * GROUP] * len(times),
            "completion_length": [r["completion_length"] for r in result.metrics],
            "reward": [r["reward"] for r in result.metrics], "peak_rss_gb": round(peak_rss_gb(), 3)}


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from peftlab.config import ModelConfig
    from peftlab.model.load import load_model

    torch.set_num_threads(1)
    model, tok = load_model(ModelConfig(name="smollm2-135m"))
    recs = json.loads(Path(spec["data"]).read_text())
    ds = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in recs])

    def exact_match(completions, answer, **kwargs):
        return [exact(c[-1]["content"] if isinstance(c, list) else c, a) for c, a in zip(completions, answer)]

    args = GRPOConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, bf16=False, fp16=False,
                      per_device_train_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1,
                      steps_per_generation=1, num_iterations=1, num_generations=GROUP, max_completion_length=MAX_NEW,
                      temperature=1.0, top_p=1.0, beta=0.0, loss_type="grpo", learning_rate=LR,
                      lr_scheduler_type="constant", warmup_steps=0, max_steps=spec["steps"], logging_steps=1,
                      save_strategy="no", dataloader_num_workers=0, seed=42, disable_tqdm=True, shuffle_dataset=False,
                      gradient_checkpointing=False, log_completions=False)
    peft_cfg = LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=args, train_dataset=ds, processing_class=tok,
                          peft_config=peft_cfg, callbacks=[Clock()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {"side": "trl", "step_s": times, "completions": [PROMPTS * GROUP] * len(times),
            "completion_length": [h.get("completions/mean_length") for h in logs],
            "reward": [h["reward"] for h in logs], "peak_rss_gb": round(peak_rss_gb(), 3)}


def summary(results: list[dict]) -> dict:
    out = {}
    for side in ("peftlab", "trl"):
        runs = [r for r in results if r["side"] == side]
        steps = [s for r in runs for s in r["step_s"][1:]]
        rates = [c / s for r in runs for c, s in zip(r["completions"][1:], r["step_s"][1:])]
        lengths = [x for r in runs for x in r["completion_length"][1:] if x is not None]
        out[side] = {"completions_per_s_median": round(statistics.median(rates), 3),
                     "steps_per_hour_median": round(3600 / statistics.median(steps), 1),
                     "step_s_median": round(statistics.median(steps), 2),
                     "completion_length_mean": round(statistics.mean(lengths), 2) if lengths else None,
                     "peak_rss_gb": max(r["peak_rss_gb"] for r in runs)}
    out["speedup_completions_per_s"] = round(out["peftlab"]["completions_per_s_median"]
                                             / out["trl"]["completions_per_s_median"], 2)
    out["speedup_steps_per_hour"] = round(out["peftlab"]["steps_per_hour_median"] / out["trl"]["steps_per_hour_median"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grpo_vs_trl.json"))
    p.add_argument("--worker")
    a = p.parse_args()
    if a.worker:
        spec = json.loads(a.worker)
        print(json.dumps(run_peftlab(spec) if spec["name"] == "peftlab" else run_trl(spec)))
        return
    records = select_records(a.steps * PROMPTS)
    data = Path(tempfile.mkdtemp())
    (data / "prompts.json").write_text(json.dumps(records))  # TRL's side
    (data / "sft.jsonl").write_text("".join(json.dumps({"messages": r["prompt"] + [{"role": "assistant",
                                                                                      "content": r["answer"]}]}) + "\n"
                                            for r in records))  # peftlab's side: SFT data, the answer is the reference
    side_by_side(Path(__file__),
                 lambda name: {"name": name, "data": str(data / ("sft.jsonl" if name == "peftlab" else "prompts.json")),
                               "steps": a.steps},
                 a.repeats, ("step_s", "completion_length", "reward"), summary,
                 {"model": "smollm2-135m", "lora": f"r={RANK} alpha=16 all-linear", "prompts_per_step": PROMPTS,
                  "num_generations": GROUP, "max_completion_length": MAX_NEW, "steps": a.steps,
                  "dtype": "float32", "threads": 1, "beta": 0.0, "loss_type": "grpo"}, a.out)

if __name__ == "__main__":
    main()
