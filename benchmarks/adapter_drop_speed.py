"""AdapterDrop's training-step cost against n (the lowest layers without adapters), measured head to head.

    env PYTHONPATH=src python benchmarks/adapter_drop_speed.py --out benchmarks/results/adapter_drop_speed.json

SmolLM2-135M-Instruct with a serial bottleneck adapter (b = 64, both sites) and ``peft.drop_layers`` =
0, 20 and 29 of its 30 layers, in one process, one thread, float32. It first checks, per model, the
first decoder layer whose output requires a gradient (= n: below it autograd records nothing, so the
backward pass stops there), then times forward and backward of the same batch (8 x 128 random ids)
for the models in turn, ``--reps`` rounds, so a change in the machine's load hits every n alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--drops", default="0,20,29")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/adapter_drop_speed.json")
    args = p.parse_args()

    import torch

    from peftlab import registry
    from peftlab.config import build_dataclass
    from peftlab.configure import load_config
    from peftlab.methods.adapter import decoder_layers
    from peftlab.model.load import load_model

    torch.set_num_threads(1)
    base, _ = load_model(load_config(None, ["model.name=smollm2-135m"]).model, seed=0)
    ids = torch.randint(100, 40000, (8, 128), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    method = registry.get("adapter")
    models = {}
    for n in map(int, args.drops.split(",")):
        model = copy.deepcopy(base)
        method.apply(model, build_dataclass(method.config_cls, {"method": "adapter", "bottleneck": 64,
                                                                "drop_layers": n}, "peft"))
        models[n] = model.train()
    first_with_grad = {}
    for n, model in models.items():
        seen = {}
        hooks = [layer.register_forward_hook(lambda m, a, o, i=i, seen=seen: seen.__setitem__(
            i, (o[0] if isinstance(o, tuple) else o).requires_grad)) for i, (_, layer) in enumerate(decoder_layers(model))]
        model(**batch).loss.backward()
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        first_with_grad[n] = min(i for i, v in seen.items() if v)
    times = {n: {"forward_s": [], "backward_s": []} for n in models}
    for _ in range(args.reps):
        for n, model in models.items():
            t0 = time.perf_counter()
            loss = model(**batch).loss
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            times[n]["forward_s"].append(round(t1 - t0, 2))
            times[n]["backward_s"].append(round(t2 - t1, 2))
    result = {"command": "env PYTHONPATH=src python benchmarks/adapter_drop_speed.py " + " ".join(sys.argv[1:]),
              "first_layer_with_grad": first_with_grad, "times": times}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
