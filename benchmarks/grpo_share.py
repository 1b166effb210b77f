"""GRPO's shared-prompt forward (grpo.share_prompt, train/grpo_share.py) against the plain
[prompt ; completion] forward: the policy log-probabilities' forward + backward of one micro-batch.

    python benchmarks/grpo_share.py [PROMPTS=8] [REPEATS=2]

SmolLM2-135M-Instruct with configs/grpo.yaml's LoRA (r=8 on every linear layer), fp32, 2 threads;
the first PROMPTS prompts of builtin:tasks (chat template), G=8 completions each of 5-20 random
tokens (seeded: the work, not the sampling, is measured). Alternating plain / shared, REPEATS
times: CPU seconds (process_time), wall seconds, and the bytes of the tensors autograd saves for
backward (each storage once); then the largest log-prob difference and the largest per-parameter
gradient difference relative to its norm.
"""

from __future__ import annotations

import random
import sys
import time

import torch

from peftlab.configure import load_config
from peftlab.train import setup
from peftlab.train.grpo_rollout import completion_logps, layout
from peftlab.train.grpo_share import share_layout
from peftlab.train.pref_setup import prepare_data

P = int(sys.argv[1]) if len(sys.argv) > 1 else 8
REPS = int(sys.argv[2]) if len(sys.argv) > 2 else 2
G = 8
torch.set_num_threads(2)
cfg = load_config("configs/grpo.yaml", ["data.path=builtin:tasks"])
model, tok = setup.prepared_model(cfg, None, None)
data = setup.load_data(cfg, tok, cfg.train.seed)
prepare_data(cfg, data)
unique = [list(e.input_ids) for e in data.train[:P]]
rng = random.Random(0)
completions = [[rng.randrange(100, 40000) for _ in range(rng.randint(5, 20))] for _ in range(P * G)]
batch = layout([p for p in unique for _ in range(G)], completions, data.pad_id)
batch.update(share_layout(unique, completions, data.pad_id))
print("prompt lengths", [len(p) for p in unique], "completion tokens", sum(map(len, completions)), flush=True)
params = [p for p in model.parameters() if p.requires_grad]
model.train()
w = torch.randn(batch["completion_mask"].shape, generator=torch.Generator().manual_seed(0))

def step(shared):
    saved, seen = [0], set()
    def pack(t):  # each storage once: the base weights saved by both forwards of the shared path are one copy
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            saved[0] += st.nbytes()
        return t
    c0, w0 = time.process_time(), time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps = completion_logps(model, batch, 1.0, shared)
    grads = torch.autograd.grad((logps * w).sum(), params)
    return time.process_time() - c0, time.perf_counter() - w0, saved[0], logps.detach(), grads

res = {False: [], True: []}
for rep in range(REPS):
    for shared in (False, True):
        cpu, wall, saved, logps, grads = step(shared)
        res[shared].append((cpu, wall, saved, logps, grads))
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        print(f"rep {rep} shared={shared}: cpu {cpu:.1f} s, wall {wall:.1f} s, saved for backward {saved/2**20:.0f} MiB, load {load}", flush=True)
a, b = res[True][0], res[False][0]
print("max |dlogp|", float((a[3] - b[3]).abs().max()),
      "max grad rel-norm diff", max(float((x - y).norm() / y.norm()) for x, y in zip(a[4], b[4]) if y.norm() > 0))
for shared in (False, True):
    print(f"shared={shared}: cpu s {[round(r[0], 1) for r in res[shared]]}, wall s {[round(r[1], 1) for r in res[shared]]}")
