"""Write a Hugging Face causal LM (a merged peftlab model) as one GGUF file for llama.cpp and Ollama.

GGUF is llama.cpp's single-file format: key/value metadata (architecture hyper-parameters, the
tokenizer's vocabulary and merges, special ids, chat template) followed by named tensors. This
writer uses the `gguf` package (llama.cpp's own Python library) for the container, its tensor
name map (``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q``) and its quantisers, so the names
and block layouts are llama.cpp's, not a copy of them.

What it knows (anything else is refused by name, never written half-right):

    architectures   LlamaForCausalLM, MistralForCausalLM (llama.cpp arch "llama"), Qwen2ForCausalLM ("qwen2")
    tokenizers      byte-level BPE (llama.cpp "gpt2") whose pre-tokenizer is one llama.cpp names:
                    SmolLM/SmolLM2 ("smollm"), Qwen2 ("qwen2"), Llama 3 ("llama-bpe"), plain GPT-2
                    byte-level ("gpt-2") — or ``pre=`` given
    types           f16, bf16, q8_0 for matrices (rows whose length is not a multiple of 32 fall back
                    to f16 under q8_0, as llama.cpp does); vectors (norms, biases) stay f32

llama.cpp stores Llama's q/k projections with each head's rotary halves interleaved; ``_permute``
does that reordering (transformers' GGUF loader undoes it on read, which is how the export is
checked: see ``export/gguf_export.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError

TYPES = ("f16", "bf16", "q8_0")
ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
PERMUTE_QK = {"llama"}  # llama.cpp's rotary layout for q/k rows
# llama.cpp's pre-tokenizer names, recognised by special tokens at fixed ids (vocab size, id -> token)
KNOWN_PRE = {
    "smollm": (49152, {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"}),
    "qwen2": (None, {151643: "<|endoftext|>", 151644: "<|im_start|>"}),
    "llama-bpe": (None, {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>"}),
}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


@dataclass
class GGUFWritten:
    path: Path
    arch: str
    tensor_types: dict[str, str]  # gguf tensor name -> ggml type name


def gguf_arch(model: nn.Module) -> str:
    names = list(getattr(model.config, "architectures", None) or [type(model).__name__])
    for name in names:
        if name in ARCHS:
            return ARCHS[name]
    raise ConfigError(
        f"GGUF export does not know the architecture {names[0]!r}; it writes {', '.join(sorted(ARCHS))}. "
        "Export a Hugging Face directory with `peftlab merge` and convert it with llama.cpp's "
        "convert_hf_to_gguf.py instead"
    )


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head go from [first rotary half; second half] to interleaved pairs (llama.cpp)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_name(arch: str, hf_name: str, blocks: int) -> str:
    import gguf

    tmap = gguf.get_tensor_name_map(_arch_enum(arch), blocks)
    name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ConfigError(f"GGUF export: tensor {hf_name!r} has no llama.cpp name for architecture {arch!r}")
    return name


def _arch_enum(arch: str):
    import gguf

    return {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]


def qk_heads(hf_name: str, config) -> int | None:
    """How many heads to permute ``hf_name``'s rows by (None: not a q/k projection)."""
    if hf_name.endswith("q_proj.weight") or hf_name.endswith("q_proj.bias"):
        return config.num_attention_heads
    if hf_name.endswith("k_proj.weight") or hf_name.endswith("k_proj.bias"):
        return config.num_key_value_heads or config.num_attention_heads
    return None


def tensor_bytes(arr: np.ndarray, kind: str):
    """(array to write, ggml type) for a float32 ``arr`` stored as ``kind`` (f32|f16|bf16|q8_0)."""
    import gguf

    q = gguf.GGMLQuantizationType
    if arr.ndim < 2 or kind == "f32":
        return arr.astype(np.float32), q.F32
    if kind == "q8_0" and arr.shape[-1] % 32 != 0:
        kind = "f16"
    if kind == "f16":
        return arr.astype(np.float16), q.F16
    qtype = q.BF16 if kind == "bf16" else q.Q8_0
    return gguf.quants.quantize(arr, qtype), qtype


def tokenizer_pre(tokenizer, pre: str | None) -> str:
    if pre:
        return pre
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    for name, (size, marks) in KNOWN_PRE.items():
        if (size is None or len(tokenizer) == size) and all(by_id.get(i) == t for i, t in marks.items()):
            return name
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()).get("pre_tokenizer") if backend is not None else None
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"  # byte-level with GPT-2's split regex and nothing else: llama.cpp's "gpt-2"
    raise ConfigError(
        "GGUF export: this tokenizer's pre-tokenizer is not one the writer recognises "
        f"({', '.join(KNOWN_PRE)}, gpt-2); llama.cpp needs its name to split text the same way. Pass it "
        "explicitly with --gguf-pre NAME (llama.cpp's name, e.g. 'llama-bpe', 'qwen2', 'smollm')"
    )


def _write_tokenizer(writer, tokenizer, vocab_size: int, pre: str | None, chat_template: str | None) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ConfigError(
            "GGUF export writes byte-level BPE tokenizers (llama.cpp 'gpt2'); this tokenizer is "
            f"{model.get('type') or type(tokenizer).__name__!r}. Convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {a.content: a.special for a in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        else:
            tokens.append(tok)
            types.append(TOKEN_NORMAL if tok not in added else TOKEN_CONTROL if added[tok] else TOKEN_USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_add_space_prefix(False)  # byte-level BPE encodes a leading space itself
    writer.add_tokenizer_pre(tokenizer_pre(tokenizer, pre))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                      ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id)):
        if tid is not None:
            {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unknown": writer.add_unk_token_id,
             "padding": writer.add_pad_token_id}[name](int(tid))
    probe = tokenizer("a", add_special_tokens=True).input_ids
    writer.add_add_bos_token(bool(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]))
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def _write_hparams(writer, config, name: str, kind: str) -> None:
    import gguf

    rope = getattr(config, "rope_scaling", None) or {}
    if rope and rope.get("rope_type", rope.get("type")) not in (None, "default", "linear"):
        raise ConfigError(
            f"GGUF export: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not written by this exporter; "
            "convert with llama.cpp's convert_hf_to_gguf.py"
        )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(config.num_key_value_heads or heads))
    theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    writer.add_rope_freq_base(float(theta or 10000.0))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    if rope.get("rope_type", rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(model: nn.Module, tokenizer, path: str | Path, kind: str = "f16", *, name: str = "peftlab-export",
               pre: str | None = None, chat_template: str | None = None) -> GGUFWritten:
    """Write ``model`` (any dtype; read as float32) and ``tokenizer`` to the GGUF file ``path``."""
    import gguf

    if kind not in TYPES:
        raise ConfigError(f"GGUF type {kind!r} is not one of {', '.join(TYPES)}")
    if tokenizer is None:
        raise ConfigError("GGUF export needs the model's tokenizer (llama.cpp keeps it inside the file); "
                          "this model has none")
    arch = gguf_arch(model)
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    _write_hparams(writer, config, name, kind)
    _write_tokenizer(writer, tokenizer, int(config.vocab_size), pre, chat_template)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    written: dict[str, str] = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reads the head from token_embd when output.weight is absent
        if "rotary_emb" in hf_name:
            continue
        out_name = gguf_tensor_name(arch, hf_name, int(config.num_hidden_layers))
        arr = tensor.detach().to(torch.float32).cpu().numpy()
        heads = qk_heads(hf_name, config) if arch in PERMUTE_QK else None
        if heads is not None:
            arr = _permute(arr, heads)
        data, qtype = tensor_bytes(arr, kind)
        writer.add_tensor(out_name, data, raw_dtype=qtype)
        written[out_name] = qtype.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFWritten(Path(path), arch, written)
