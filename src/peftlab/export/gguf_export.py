"""``peftlab export --format gguf``: a run's merged model (or its LoRA alone) as GGUF, checked on read-back.

Merged model (``model.gguf`` + an Ollama ``Modelfile`` + ``peftlab_export.json``):

    merge the adapter into its base in float32 (``export.merge.merge_adapter``) -> write_gguf ->
    read the file back with transformers' own GGUF loader (an independent reader) -> compare

The check is exact where the type allows it: the file's logits must equal those of the merged
model whose weights were rounded the same way (f16/bf16 rounding, q8_0 quantise-dequantise by
the `gguf` package), within float32 round-off; the tokenizer read back must encode the probe to
the same ids. The error against the unrounded merged model is measured and recorded. A failed
check writes nothing.

Adapter only (``--adapter-only``, ``adapter.gguf``): a LoRA adapter as llama.cpp's LoRA GGUF
(``general.type=adapter``, ``adapter.type=lora``, ``adapter.lora.alpha``; tensors
``blk.N.attn_q.weight.lora_a`` [r, in] and ``.lora_b`` [out, r]) for ``llama-cli -m BASE.gguf
--lora adapter.gguf``. llama.cpp scales by alpha / r, so alpha is written as s·r for the scale s
peftlab used (rsLoRA included); Llama's q/k rows are permuted like the base's, which for ΔW = B·A
means permuting B's rows. Plain LoRA only (llama.cpp's LoRA has no DoRA magnitude or other factors).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..io import atomic_dir
from ..version import __version__
from .gguf import ARCHS, TYPES, _permute, gguf_arch, gguf_tensor_name, qk_heads, tensor_bytes, write_gguf
from .merge import _logits, chat_encoder, merge_adapter

MODEL_FILE, ADAPTER_FILE = "model.gguf", "adapter.gguf"
TOLERANCE = 1e-4  # |logit difference| vs the identically rounded model, relative to max(1, max |logit|)


@dataclass
class GGUFResult:
    out_dir: Path
    file: Path
    kind: str
    arch: str
    max_abs_diff_rounded: float | None  # vs the merged model with the same rounding (the exactness check)
    max_abs_diff_fp32: float | None  # vs the merged model in float32 (what the type costs)
    top1_agreement: float | None = None  # share of probe positions whose greedy next token is the float32 one


def rounded_like(model: nn.Module, kind: str) -> nn.Module:
    """A copy of ``model`` whose matrices went through ``kind``'s rounding and back (vectors stay f32)."""
    import gguf

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim < 2:
                continue
            if kind == "f16" or (kind == "q8_0" and p.shape[-1] % 32 != 0):
                p.copy_(p.half().float())
            elif kind == "bf16":
                p.copy_(p.bfloat16().float())
            else:
                data = gguf.quants.quantize(p.numpy(), gguf.GGMLQuantizationType.Q8_0)
                back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32)).reshape(p.shape))
    return ref


def modelfile(tokenizer, encoder) -> str:
    """An Ollama Modelfile for ``model.gguf``: its chat template in Ollama's syntax where it is ChatML,
    and the stop strings training taught the model."""
    lines = [f"FROM ./{MODEL_FILE}", ""]
    template = getattr(tokenizer, "chat_template", None) or ""
    if "<|im_start|>" in template:
        lines += ['TEMPLATE """{{- if .System }}<|im_start|>system', "{{ .System }}<|im_end|>",
                  "{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}", "{{ .Content }}<|im_end|>",
                  '{{ end }}<|im_start|>assistant', '"""', ""]
    stops = list(encoder.renderer.stop_strings) if encoder is not None else []
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    return "\n".join(lines) + "\n"


def export_gguf(out_dir: str | Path, *, run: str | Path | None = None, adapter: str | Path | None = None,
                overrides: list[str] | None = None, kind: str = "f16", adapter_only: bool = False,
                verify: bool = True, pre: str | None = None, template: str | None = None) -> GGUFResult:
    if kind not in TYPES:
        raise ConfigError(f"--type {kind!r} is not one of {', '.join(TYPES)}")
    if adapter_only:
        return export_lora_gguf(out_dir, run=run, adapter=adapter, overrides=overrides, kind=kind)
    merged = merge_adapter(adapter=adapter, run=run, overrides=overrides, reference=False)
    model, tokenizer = merged.model, merged.tokenizer
    gguf_arch(model)  # refuse an unknown architecture before any work
    encoder = chat_encoder(tokenizer, template)
    out_dir = Path(out_dir)
    diff_r = diff_f = top1 = None
    with atomic_dir(out_dir) as tmp:
        written = write_gguf(model, tokenizer, tmp / MODEL_FILE, kind, name=Path(str(merged.model_cfg.name)).name,
                             pre=pre)
        if verify:
            diff_r, diff_f, top1 = _check(model, tokenizer, tmp, kind, merged.probe)
        (tmp / "Modelfile").write_text(modelfile(tokenizer, encoder))
        info = {"peftlab_version": __version__, "base_model": merged.model_cfg.name,
                "adapter": str(merged.adapter_dir), "method": merged.method_name, "type": kind, "arch": written.arch,
                "max_abs_logit_diff_vs_rounded": diff_r, "max_abs_logit_diff_vs_fp32": diff_f,
                "top1_agreement_vs_fp32": top1,
                "untied_embeddings": merged.untied}
        (tmp / "peftlab_export.json").write_text(json.dumps(info, indent=2))
    return GGUFResult(out_dir, out_dir / MODEL_FILE, kind, written.arch, diff_r, diff_f, top1)


def _check(model: nn.Module, tokenizer, tmp: Path, kind: str, probe: torch.Tensor) -> tuple[float, float, float]:
    """Read ``tmp/model.gguf`` back with transformers; (diff vs rounded model, diff vs fp32 model,
    greedy next-token agreement with the fp32 model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    back = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=MODEL_FILE, dtype=torch.float32)
    got = _logits(back, probe)
    del back
    want = _logits(rounded_like(model, kind), probe)
    exact = _logits(model, probe)
    diff_r, diff_f = float((got - want).abs().max()), float((got - exact).abs().max())
    tol = TOLERANCE * max(1.0, float(want.abs().max()))
    if not diff_r <= tol:
        raise ConfigError(f"the GGUF file read back by transformers gives logits {diff_r:.3g} away from the "
                          f"merged model rounded to {kind} (> {tol:.3g}); nothing was written. This is a bug: "
                          "please report it with the run's config.yaml")
    text = tokenizer.decode(probe[0].tolist())
    back_tok = AutoTokenizer.from_pretrained(tmp, gguf_file=MODEL_FILE)
    a = tokenizer(text, add_special_tokens=False).input_ids
    b = back_tok(text, add_special_tokens=False).input_ids
    if a != b:
        raise ConfigError("the GGUF file's tokenizer, read back by transformers, splits text differently from the "
                          f"model's ({a[:8]}... vs {b[:8]}...); nothing was written. Pass --gguf-pre with "
                          "llama.cpp's pre-tokenizer name for this tokenizer")
    return diff_r, diff_f, float((got.argmax(-1) == exact.argmax(-1)).float().mean())


def _refuse_unportable(peft_cfg, adapter_dir) -> None:
    """llama.cpp's LoRA is W + (alpha/r)·B·A on the unchanged base: refuse what is more than that."""
    why = None
    if peft_cfg.method != "lora":
        why = f"is {peft_cfg.method!r}, not plain LoRA"
    elif peft_cfg.init in ("pissa", "olora"):
        why = f"uses init={peft_cfg.init!r}, which changes the base weights the adapter sits on"
    elif peft_cfg.enable_lora or peft_cfg.merge_first or peft_cfg.additional_targets:
        why = "has fused-layer slices, merged-first adapters or fully trained extra modules"
    if why:
        raise ConfigError(f"--adapter-only writes llama.cpp LoRA files (W + alpha/r·B·A on the unchanged base); "
                          f"{adapter_dir} {why}. Export the merged model instead (drop --adapter-only)")


def export_lora_gguf(out_dir: str | Path, *, run=None, adapter=None, overrides=None, kind: str = "f16") -> GGUFResult:
    """Write the run's LoRA factors as llama.cpp's LoRA GGUF (no base weights)."""
    import gguf

    from ..methods.lowrank import LoRAEmbedding, LoRALinear
    from .adapter import adapter_method_config, load_adapter
    from .merge import resolve_base

    if (adapter is None) == (run is None):
        raise ConfigError("give exactly one of --adapter DIR or --run RUN_DIR")
    model_cfg, seed, adapter_dir = resolve_base(Path(adapter) if adapter else None, Path(run) if run else None,
                                                list(overrides or []))
    peft_cfg = adapter_method_config(adapter_dir)
    _refuse_unportable(peft_cfg, adapter_dir)
    from ..model.load import load_model

    base_cfg = copy.deepcopy(model_cfg)
    base_cfg.dtype = "float32"
    model, _ = load_model(base_cfg, seed=seed, with_tokenizer=False)
    arch = gguf_arch(model)
    load_adapter(model, adapter_dir, peft_cfg)
    config, blocks = model.config, int(model.config.num_hidden_layers)
    out_dir = Path(out_dir)
    written: dict[str, str] = {}
    with atomic_dir(out_dir) as tmp:
        writer = gguf.GGUFWriter(str(tmp / ADAPTER_FILE), arch)
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        scales = set()
        for name, mod in model.named_modules():
            if isinstance(mod, LoRAEmbedding):
                raise ConfigError(f"{adapter_dir} has LoRA on the embeddings ({name}); --adapter-only writes LoRA on "
                                  "linear projections. Export the merged model instead (drop --adapter-only)")
            if not isinstance(mod, LoRALinear):
                continue
            if mod.fan_in_fan_out:
                raise ConfigError(f"{name} is a Conv1D layer (GPT-2); llama.cpp's LoRA GGUF covers "
                                  f"{', '.join(sorted(set(ARCHS.values())))} models")
            a = mod.lora_A.weight.detach().float().numpy()
            b = mod.lora_B.weight.detach().float().numpy()
            heads = qk_heads(name + ".weight", config) if arch in {"llama"} else None
            if heads is not None:
                b = _permute(b, heads)
            base = gguf_tensor_name(arch, name + ".weight", blocks)
            for suffix, arr in ((".lora_a", a), (".lora_b", b)):
                data, qtype = tensor_bytes(np.ascontiguousarray(arr), "f32" if kind == "q8_0" else kind)
                writer.add_tensor(base + suffix, data, raw_dtype=qtype)
                written[base + suffix] = qtype.name
            scales.add((float(mod.scaling), int(a.shape[0])))
        if not written:
            raise ConfigError(f"{adapter_dir} holds no LoRA layers on linear projections; nothing to export")
        if len(scales) != 1:
            raise ConfigError(f"{adapter_dir} uses different LoRA ranks or scales per layer ({sorted(scales)}); "
                              "llama.cpp's LoRA GGUF has one alpha. Export the merged model instead")
        (scale, r), = scales
        writer.add_float32("adapter.lora.alpha", scale * r)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        info = {"peftlab_version": __version__, "base_model": model_cfg.name, "adapter": str(adapter_dir),
                "type": kind, "arch": arch, "lora_alpha_written": scale * r, "rank": r, "tensors": len(written)}
        (tmp / "peftlab_export.json").write_text(json.dumps(info, indent=2))
    return GGUFResult(out_dir, out_dir / ADAPTER_FILE, kind, arch, None, None)
