"""Resident memory of the real base model stored fp32 / bf16 / int8 / NF4, and what merging a
QLoRA adapter costs in precision.

    flock /work/heavy.lock python benchmarks/qlora_memory.py [--adapter RUN/adapter] [--out FILE.json]

Memory: each mode loads ``smollm2-135m`` in a fresh process and reports its resident set size
(VmRSS, after returning freed heap pages to the OS) minus the RSS of the same process before the
load — measured after one forward pass, because an fp32 checkpoint is memory-mapped and becomes
resident only as it is read — the bytes held by the model's tensors, and the time of one forward
pass over 4 x 128 tokens (1 thread).

Merge precision (with ``--adapter``, a QLoRA adapter trained on the NF4 base): logits of the
unmerged model (NF4 base + fp32 adapter) against (a) the adapter merged into the dequantised base
in fp32, (b) the same exported in bf16, (c) the adapter merged into the *original* float weights —
the base it was not trained on, the common mistake. Errors are relative to the largest |logit|.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
MODES = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("bfloat16", "int8"),
         "nf4": ("bfloat16", "nf4")}


def measure(mode: str) -> dict:
    """Runs in a child process: load one mode, report memory and a forward-pass time."""
    import torch

    from peftlab.config import ModelConfig
    from peftlab.model.load import load_model
    from peftlab.quant.convert import release_memory, resident_memory, tensor_bytes

    torch.set_num_threads(1)
    dtype, quant = MODES[mode]
    import transformers.models.llama.modeling_llama  # noqa: F401  (before the baseline: only the model counts)

    release_memory()
    before = resident_memory()
    model, _ = load_model(ModelConfig(name="smollm2-135m", dtype=dtype, quantize=quant), with_tokenizer=False)
    release_memory()
    after_load = resident_memory()
    ids = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)  # warm-up; touches every weight (an fp32 file is memory-mapped, resident only once read)
        t0 = time.perf_counter()
        model(ids)
        forward = time.perf_counter() - t0
    release_memory()
    after = resident_memory()
    return {"mode": mode, "rss_mb": round((after - before) / 2**20, 1),
            "rss_after_load_mb": round((after_load - before) / 2**20, 1),
            "tensor_mb": round(tensor_bytes(model)["total"] / 2**20, 1), "forward_s": round(forward, 3)}


def merge_precision(adapter: str) -> dict:
    import torch

    from peftlab import registry
    from peftlab.config import ModelConfig
    from peftlab.export.adapter import load_adapter
    from peftlab.model.load import load_model

    torch.set_num_threads(1)
    ids = torch.randint(0, 49152, (2, 96), generator=torch.Generator().manual_seed(1))
    nf4, _ = load_model(ModelConfig(name="smollm2-135m", quantize="nf4"), with_tokenizer=False)
    cfg = load_adapter(nf4, adapter)
    method = registry.get(cfg.method)
    with torch.no_grad():
        want = nf4(ids).logits
        scale = want.abs().max().item()
        method.merge(nf4)
        fp32 = (nf4(ids).logits - want).abs().max().item() / scale
        bf16 = (nf4.to(torch.bfloat16)(ids).logits.float() - want).abs().max().item() / scale
    plain, _ = load_model(ModelConfig(name="smollm2-135m"), with_tokenizer=False)
    load_adapter(plain, adapter)
    registry.get(cfg.method).merge(plain)
    with torch.no_grad():
        wrong = (plain(ids).logits - want).abs().max().item() / scale
        agree = float((plain(ids).logits.argmax(-1) == want.argmax(-1)).float().mean())
    return {"merged_dequantised_fp32": fp32, "merged_dequantised_bf16": bf16, "merged_into_original_fp32": wrong,
            "argmax_agreement_original_base": agree}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--adapter", help="a QLoRA adapter (trained on the nf4 base) for the merge-precision table")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return 0
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    rows = []
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True, env=env,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'base':<6}{'RSS MB':>10}{'tensors MB':>12}{'forward s':>11}")
    for r in rows:
        print(f"{r['mode']:<6}{r['rss_mb']:>10}{r['tensor_mb']:>12}{r['forward_s']:>11}")
    result = {"memory": rows}
    if args.adapter:
        result["merge"] = merge_precision(args.adapter)
        for k, v in result["merge"].items():
            print(f"{k}: {v:.3g}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, SRC)
    sys.exit(main())
