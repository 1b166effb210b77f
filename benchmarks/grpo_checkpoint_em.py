"""Held-out exact match of a GRPO run's checkpoint (docs/results.md section 4).

    python benchmarks/grpo_checkpoint_em.py RUN/checkpoints/step-000020 --run RUN --sft SFT_RUN/adapter

The checkpoint's trainable tensors (the LoRA factors) go onto the SFT adapter's model built from
the GRPO run's config.yaml, and the run's held-out prompts are scored as ``peftlab eval`` scores
them (greedy, 24 new tokens, eval.metrics.exact_match): a run stopped between checkpoints, or
each checkpoint of a run, can be scored without a final adapter.
"""
import argparse
import json
import time

from safetensors.torch import load_file

from peftlab.data.dataset import build_datasets
from peftlab.eval.generate import generate, load_for_generation
from peftlab.eval.metrics import exact_match

p = argparse.ArgumentParser()
p.add_argument("checkpoint")
p.add_argument("--run", required=True, help="the GRPO run directory (its config.yaml)")
p.add_argument("--sft", required=True, help="the adapter the GRPO run started from (peft.init_from)")
a = p.parse_args()
ckpt = a.checkpoint
model, tok, enc, cfg = load_for_generation(None, a.sft, [f"{a.run}/config.yaml"])
state = load_file(f"{ckpt}/trainable.safetensors")
missing, unexpected = model.load_state_dict(state, strict=False)
assert not unexpected, unexpected[:3]
assert len(state) > 0 and all(k in dict(model.named_parameters()) for k in state), list(state)[:3]
data = build_datasets(cfg.data, tok, cfg.train.seed)
recs = data.eval_records
t = time.time()
preds = generate(model, tok, enc, [r.messages[:-1] for r in recs], max_new_tokens=24, batch_size=16)
em = sum(exact_match(pred, r.messages[-1]["content"]) for pred, r in zip(preds, recs)) / len(recs)
print(json.dumps({"checkpoint": ckpt, "n": len(recs), "exact_match": round(100 * em, 1), "gen_s": round(time.time() - t, 1)}))
