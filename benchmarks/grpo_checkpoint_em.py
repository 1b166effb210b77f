"""Held-out exact match of a run's checkpoints (docs/results.md section 4).

    python benchmarks/grpo_checkpoint_em.py RUN/checkpoints/step-000010 RUN/checkpoints/step-000020 \
        --run RUN --sft SFT_RUN/adapter [--save-adapter DIR] [--per-task]

Each checkpoint's trainable tensors (the LoRA factors) go onto the SFT adapter's model built from
the run's config.yaml, and the run's held-out prompts are scored as ``peftlab eval`` scores them
(greedy, 24 new tokens, eval.metrics.exact_match): a run stopped between checkpoints, or each
checkpoint of a run, can be scored without a final adapter, with the model loaded once.
``--sft`` alone (no checkpoint, or the word ``sft``) scores the starting adapter itself; without
``--sft`` the run's method is applied afresh before each checkpoint's tensors are loaded.
``--save-adapter DIR`` writes the (last) checkpoint as an adapter, for ``peft.init_from`` (a
shorter SFT start taken from an SFT run's checkpoint).
"""
import argparse
import json
import time

from safetensors.torch import load_file

from peftlab.data.dataset import build_datasets
from peftlab.eval.generate import generate, load_for_generation
from peftlab.eval.metrics import exact_match
from peftlab.export.adapter import save_adapter

p = argparse.ArgumentParser()
p.add_argument("checkpoints", nargs="*", help="checkpoint directories; 'sft' scores the --sft adapter itself")
p.add_argument("--run", required=True, help="the run directory (its config.yaml: data split, seed)")
p.add_argument("--sft", help="the adapter the run started from (peft.init_from); without it the run's method "
               "is applied afresh (an SFT run's own checkpoints)")
p.add_argument("--save-adapter", help="write the last checkpoint's tensors as an adapter here")
p.add_argument("--per-task", action="store_true", help="also exact match per task kind (builtin:tasks)")
a = p.parse_args()
if a.sft:
    model, tok, enc, cfg = load_for_generation(None, a.sft, [f"{a.run}/config.yaml"])
else:
    from peftlab.configure import load_config
    from peftlab.data.tokenize import Encoder
    from peftlab.train.setup import prepared_model

    cfg = load_config(f"{a.run}/config.yaml", [])
    model, tok = prepared_model(cfg, None, None)
    enc = Encoder(tok, cfg.data.template, cfg.data.max_length, cfg.data.system)
data = build_datasets(cfg.data, tok, cfg.train.seed)
recs = data.eval_records
params = dict(model.named_parameters())
KINDS = {"Write the number": "words", "Convert": "time", "Sort": "sort", "What is": "add", "Uppercase": "upper",
         "Reverse": "reverse"}
for ckpt in a.checkpoints or ["sft"]:
    if ckpt != "sft":
        state = load_file(f"{ckpt}/trainable.safetensors")
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected, unexpected[:3]
        assert len(state) > 0 and all(k in params for k in state), list(state)[:3]
    t = time.time()
    preds = generate(model, tok, enc, [r.messages[:-1] for r in recs], max_new_tokens=24, batch_size=16)
    hits = [exact_match(pred, r.messages[-1]["content"]) for pred, r in zip(preds, recs)]
    out = {"checkpoint": ckpt, "n": len(recs), "exact_match": round(100 * sum(hits) / len(recs), 1),
           "gen_s": round(time.time() - t, 1)}
    if a.per_task:
        per: dict[str, list[float]] = {}
        for h, r in zip(hits, recs):
            q = r.messages[-2]["content"]
            per.setdefault(next((v for k, v in KINDS.items() if q.startswith(k)), "other"), []).append(h)
        out["per_task"] = {k: f"{int(sum(v))}/{len(v)}" for k, v in sorted(per.items())}
    print(json.dumps(out), flush=True)
if a.save_adapter:
    save_adapter(model, cfg.peft, a.save_adapter, cfg.model.name)
    print(json.dumps({"adapter": a.save_adapter}))
