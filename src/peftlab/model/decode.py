"""A lean decoder for Llama-family models: fused weights and a preallocated KV cache, greedy or sampled.

It lives on the model floor so that evaluation (``peftlab generate``, eval/generate.py) and
training (GRPO's rollouts, train/grpo_rollout.py) decode through the same code: the same weights,
the same seed, the same tokens. ``peftlab.eval.decode`` re-exports it.

Hugging Face ``generate`` wraps each token in 30 layers of module calls, cache objects, mask
building and logits processors. This decoder runs the same math with the fewest ops it can
(at batch 1 every weight is read once per token, so the products are matrix-vector ones; torch's
CPU GEMV runs them on one thread, and ``linear`` below spreads each over the threads with the
same bits: 2.1x HF ``generate`` at batch 1 in fp32, benchmarks/README.md):

    per layer:  h = rms(x) ; [q k v] = h W_qkv^T            (q/k/v fused into one GEMM)
                q, k = rope(q), rope(k) ; K[:, t], V[:, t] = k, v     (preallocated cache)
                x = x + sdpa(q, K[:, :t+1], V[:, :t+1]) W_o^T
                h = rms(x) ; [g u] = h W_gu^T ; x = x + (silu(g) * u) W_down^T
    then:       logits = rms(x_last) W_head^T ; next = argmax(logits)
                or, sampling: softmax(logits / temperature), cut to the top-p nucleus, one draw
                from a ``torch.Generator`` (the caller's seed: the same seed gives the same tokens)

LoRA layers (peftlab's ``LoRALinear``, merged or not) enter as their effective weight
W + s·BA, built once per weight version and cached, so unmerged adapters decode as fast as
merged ones and the model itself is never modified. RMSNorm, RoPE (the model's own rotary
module), GQA attention (SDPA) and left padding follow transformers' Llama code, so greedy
output equals ``model.generate`` token for token (tests/test_speed_decode.py).

``supports(model)`` says whether a model qualifies (llama / mistral / qwen2 layouts, SiLU MLP,
a static RoPE type, plain or LoRA linear layers); anything else is left to HF ``generate``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary
from transformers import PreTrainedModel

ARCHS = ("llama", "mistral", "qwen2")
STATIC_ROPE = ("default", "linear", "llama3")
_CACHE = WeakIdKeyDictionary()  # model -> (fingerprint, LeanWeights)


def _is_lora(m: nn.Module) -> bool:
    return type(m).__name__ == "LoRALinear" and hasattr(m, "delta_weight") and type(m.base_layer) is nn.Linear


def _linear_ok(m: nn.Module) -> bool:
    return type(m) is nn.Linear or _is_lora(m)


def _rope_type(cfg) -> str:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"


def supports(model: nn.Module) -> bool:
    """True when ``lean_greedy`` reproduces this model's forward exactly."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in ARCHS:
        return False
    if getattr(cfg, "hidden_act", "silu") != "silu" or _rope_type(cfg) not in STATIC_ROPE:
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) \
            and cfg.model_type != "llama":
        return False
    backbone = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or type(head) is not nn.Linear or type(getattr(backbone, "embed_tokens", None)) is not nn.Embedding:
        return False
    if not isinstance(backbone, PreTrainedModel):  # a wrapped backbone (prompt/prefix methods' virtual tokens)
        return False  # does more than its layers: only its own forward, through HF generate, decodes it right
    if any(h for m in (model, backbone, backbone.embed_tokens, getattr(backbone, "norm", None), head) if m is not None
           for h in (m._forward_hooks, m._forward_pre_hooks)):
        return False
    for layer in getattr(backbone, "layers", []):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return False
        mods = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        mods += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(m is None or not _linear_ok(m) for m in mods):
            return False
        norms = [getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)]
        if any(type(n).__name__ not in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm") for n in norms):
            return False
        if any(h for m in [layer, attn, mlp, *mods] for h in (m._forward_hooks, m._forward_pre_hooks)):
            return False
    return True


def _weight(m: nn.Module) -> torch.Tensor:
    if _is_lora(m) and not m.merged:
        w = m.base_layer.weight
        return (w.float() + m.delta_weight().to(w.device)).to(w.dtype)
    return (m.base_layer if _is_lora(m) else m).weight


def _bias(m: nn.Module) -> torch.Tensor | None:
    return (m.base_layer if _is_lora(m) else m).bias


def _fused_bias(mods: list[nn.Module]) -> torch.Tensor | None:
    """The bias of the layers' fused GEMM: theirs end to end, zeros for a layer without one (Qwen2's
    q/k/v have biases, BitFit's added ones may sit on some layers only); None when none has one."""
    biases = [_bias(x) for x in mods]
    if all(b is None for b in biases):
        return None
    plain = [m.base_layer if _is_lora(m) else m for m in mods]  # shapes only: no LoRA delta built for them
    return torch.cat([b if b is not None else x.weight.new_zeros(x.weight.shape[0]) for b, x in zip(biases, plain)])


def _fingerprint(model: nn.Module) -> tuple:
    """What the cached fused weights were built from. ``_version`` alone misses in-place updates
    that do not bump it (torch's fused AdamW kernel does not), so trainable tensors add their sum:
    a step of training always changes it (cheap next to a rebuild: LoRA's factors are small)."""
    return tuple((p.data_ptr(), p._version, float(p.detach().sum()) if p.requires_grad else 0.0)
                 for p in model.parameters())


def forget(model: nn.Module) -> None:
    """Drop ``model``'s cached fused weights (the next decode rebuilds them from the live model)."""
    _CACHE.pop(model, None)


class LeanWeights:
    """Fused per-layer weights (q|k|v and gate|up concatenated), built from the live model."""

    def __init__(self, model: nn.Module):
        cfg, backbone = model.config, model.model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.embed = backbone.embed_tokens.weight
        self.final_norm = (backbone.norm.weight, backbone.norm.variance_epsilon)
        self.head = model.get_output_embeddings().weight
        self.rotary = backbone.rotary_emb
        self.layers = []
        with torch.no_grad():
            for layer in backbone.layers:
                a, m = layer.self_attn, layer.mlp
                qkv, gu = [a.q_proj, a.k_proj, a.v_proj], [m.gate_proj, m.up_proj]
                self.layers.append((
                    layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                    torch.cat([_weight(x) for x in qkv]), _fused_bias(qkv),
                    _weight(a.o_proj), _bias(a.o_proj),
                    layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                    torch.cat([_weight(x) for x in gu]), _fused_bias(gu),
                    _weight(m.down_proj), _bias(m.down_proj),
                ))


def lean_weights(model: nn.Module) -> LeanWeights:
    fp = _fingerprint(model)
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == fp:
        return hit[1]
    lw = LeanWeights(model)
    _CACHE[model] = (fp, lw)
    return lw


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dtype)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, max_rows: int = 1) -> torch.Tensor:
    """``F.linear(x, w, b)``, the same bits, with a one-row fp32 product on the CPU spread over the threads.

    At batch 1 every product is a matrix-vector one, and torch's CPU GEMV runs on one thread
    whatever ``torch.set_num_threads`` says (benchmarks/README.md: 11-12 GB/s from one core of a
    2-core EPYC, the same at 1 and 2 threads). Cut into p blocks of rows, ``w`` becomes a batch of
    p GEMVs, and ``bmm`` hands one block to each thread: every output is the same dot product over
    the same inputs in the same order, so the result equals ``F.linear``'s bit for bit
    (tests/test_speed_decode.py) at 1.7-1.9x its speed on the decoder's shapes.

    ``max_rows`` > 1 lets products of up to that many rows take the split too (1.05-1.3x at 5-16
    rows, 1.5-2x at 2-4). Those are small GEMMs, whose kernel may round differently per block than
    over the whole matrix (seen at 5 rows), so only prompt lookup's verify forwards use it: their
    several-row products already round differently from one-token decoding (model/lookup.py)."""
    p = torch.get_num_threads()
    out_f, in_f = w.shape
    rows = x.numel() // in_f if x.shape[-1] == in_f else 0
    if (p < 2 or not 1 <= rows <= max_rows or x.dtype != torch.float32 or x.device.type != "cpu"
            or out_f % p):
        return F.linear(x, w, b)
    y = torch.bmm(x.reshape(1, rows, in_f).expand(p, rows, in_f), w.view(p, out_f // p, in_f).transpose(1, 2))
    y = y.transpose(0, 1).reshape(*x.shape[:-1], out_f)  # [p, rows, O/p] -> rows of [block 0 | block 1 | ...]
    return y if b is None else y + b


def _split_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, module.weight, module.bias)


def split_products(model: nn.Module) -> int:
    """Give every plain ``nn.Linear`` of ``model`` ``linear`` as its forward (an attribute of the
    instance; hooks still run): the same bits, with one-row products spread over the threads. For
    a model decoded through Hugging Face's forward at batch 1 (the serving engine). Returns how many
    layers it changed; a layer already changed is left as it is."""
    changed = 0
    for m in model.modules():
        if type(m) is nn.Linear and "forward" not in vars(m):
            m.forward = functools.partial(_split_forward, m)
            changed += 1
    return changed


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def run_layers(lw: LeanWeights, cache: list[torch.Tensor], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               start: int, attn_mask: torch.Tensor, max_rows: int = 1) -> torch.Tensor:
    """The decoder layers over n new positions start..start+n-1: embeddings x [B, n, H] -> hidden
    states [B, n, H] before the final norm. cos, sin [B, 1, n, hd]; cache = [K, V], each
    [layers, B, n_kv, T, hd], receives the new positions' keys and values, and attention reads
    positions 0..start+n-1 of it under attn_mask [B, 1, n, start+n] (additive). Products of up to
    ``max_rows`` rows are split over the threads (``linear``)."""
    bb, n, _ = x.shape
    nh, nkv, hd = lw.n_heads, lw.n_kv, lw.head_dim
    q_size, kv_size = nh * hd, nkv * hd
    k_cache, v_cache = cache
    scale = hd ** -0.5
    gqa = nh != nkv
    # fp32 GEMMs give the same bits fused or not; in half precision a fused product can round
    # differently from HF's separate ones, and greedy decoding then drifts
    split = x.dtype != torch.float32
    for i, (n1, e1, w_qkv, b_qkv, w_o, b_o, n2, e2, w_gu, b_gu, w_d, b_d) in enumerate(lw.layers):
        h = _rms(x, n1, e1)
        if split:  # bf16/fp16: HF's three GEMMs, so every product rounds exactly as in HF
            qkv = torch.cat([F.linear(h, w_qkv[a:z], None if b_qkv is None else b_qkv[a:z])
                             for a, z in ((0, q_size), (q_size, q_size + kv_size),
                                          (q_size + kv_size, q_size + 2 * kv_size))], dim=-1)
        else:
            qkv = linear(h, w_qkv, b_qkv, max_rows)
        q = qkv[..., :q_size].view(bb, n, nh, hd).transpose(1, 2)
        k = qkv[..., q_size:q_size + kv_size].view(bb, n, nkv, hd).transpose(1, 2)
        v = qkv[..., q_size + kv_size:].view(bb, n, nkv, hd).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        k_cache[i, :, :, start:start + n] = k
        v_cache[i, :, :, start:start + n] = v
        keys, vals = k_cache[i, :, :, :start + n], v_cache[i, :, :, :start + n]
        o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
        x = x + linear(o.transpose(1, 2).reshape(bb, n, q_size), w_o, b_o, max_rows)
        h = _rms(x, n2, e2)
        if split:
            half = w_gu.shape[0] // 2
            g = F.linear(h, w_gu[:half], None if b_gu is None else b_gu[:half])
            u = F.linear(h, w_gu[half:], None if b_gu is None else b_gu[half:])
        else:
            g, u = linear(h, w_gu, b_gu, max_rows).chunk(2, dim=-1)
        x = x + linear(F.silu(g) * u, w_d, b_d, max_rows)
    return x


def lean_greedy(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                eos_ids: list[int], pad_id: int) -> torch.Tensor:
    """Greedy continuation of left-padded prompts: input_ids, attention_mask [B, T] -> [B, T + n].

    Rows that emit an id in ``eos_ids`` continue with ``pad_id`` (as HF ``generate``); the loop
    stops when every row has finished or after ``max_new_tokens``.
    """
    return lean_decode(model, input_ids, attention_mask, max_new_tokens, eos_ids, pad_id)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row [B] from logits [B, V]: argmax at temperature 0; otherwise softmax of
    logits / temperature restricted to the top-p nucleus (HF's TopPLogitsWarper: the smallest set
    of tokens whose probability reaches top_p, at least one), one multinomial draw."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def lean_decode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                eos_ids: list[int], pad_id: int, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Continuation of left-padded prompts, greedy (temperature 0) or sampled (``sample_next``):
    input_ids, attention_mask [B, T] -> [B, T + n]; finished rows continue with ``pad_id``."""
    lw = lean_weights(model)
    dev = input_ids.device
    dtype = lw.embed.dtype
    b, t = input_ids.shape
    total = t + max_new_tokens
    nkv, hd = lw.n_kv, lw.head_dim
    mask = attention_mask.to(torch.long)
    # positions as transformers computes them for left padding: cumsum(mask) - 1 (pads -> 1)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    all_pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, max_new_tokens + 1, device=dev)], dim=1)
    cos, sin = lw.rotary(lw.embed[:1], all_pos)  # [B, total, hd]
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, total, hd]
    # rows equal to the row before them (GRPO's groups: one prompt, G completions) share one prefill:
    # the prompt runs once per distinct row and its K/V are copied to the group
    same = torch.zeros(b, dtype=torch.bool, device=dev)
    if b > 1:
        same[1:] = (input_ids[1:] == input_ids[:-1]).all(1) & (mask[1:] == mask[:-1]).all(1)
    firsts = (~same).nonzero().squeeze(1)  # [U] the rows prefilled
    owner = (~same).long().cumsum(0) - 1  # [B] row -> its prefilled row
    n_pre = len(firsts)
    cache = [torch.zeros(len(lw.layers), n_pre, nkv, total, hd, dtype=dtype, device=dev)]
    cache.append(torch.zeros_like(cache[0]))
    neg = torch.finfo(dtype).min
    key_ok = torch.cat([mask.bool(), torch.ones(b, max_new_tokens, dtype=torch.bool, device=dev)], dim=1)
    causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
    prefill_mask = torch.zeros(b, 1, t, t, dtype=dtype, device=dev).masked_fill_(
        ~(causal[None, None] & key_ok[:, None, None, :t]), neg)
    step_bias = torch.zeros(b, 1, 1, total, dtype=dtype, device=dev).masked_fill_(~key_ok[:, None, None, :], neg)

    def forward(ids: torch.Tensor, start: int, attn_mask: torch.Tensor, rows: torch.Tensor | None = None
                ) -> torch.Tensor:
        n = ids.shape[1]
        c, s = cos[:, :, start:start + n], sin[:, :, start:start + n]
        if rows is not None:
            c, s = c[rows], s[rows]
        x = run_layers(lw, cache, F.embedding(ids, lw.embed), c, s, start, attn_mask)
        return linear(_rms(x[:, -1], *lw.final_norm), lw.head)

    out = torch.empty(b, total, dtype=input_ids.dtype, device=dev)
    out[:, :t] = input_ids
    if n_pre == b:
        logits = forward(input_ids, 0, prefill_mask)
    else:
        logits = forward(input_ids[firsts], 0, prefill_mask[firsts], firsts)[owner]
        cache[:] = [c[:, owner] for c in cache]  # each group's copy of its prompt's K/V
    eos = torch.tensor(sorted(set(eos_ids)), device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    n_out = 0
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[:, t + step] = nxt
        n_out = step + 1
        done |= torch.isin(nxt, eos)
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        logits = forward(nxt[:, None], t + step, step_bias[..., :t + step + 1])
    return out[:, :t + n_out]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt id lists -> (input_ids, attention_mask) [B, T], padded on the left."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[i, width - len(ids):] = 1
    return input_ids, mask


@torch.no_grad()
def continue_batch(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                   eos_ids: list[int], pad_id: int, temperature: float = 0.0, top_p: float = 1.0,
                   generator: torch.Generator | None = None, lean: bool | None = None) -> torch.Tensor:
    """[B, T] left-padded prompts -> [B, T + n]: the lean decoder for an fp32 model it supports
    (token for token HF's greedy output), else Hugging Face ``generate`` (sampling from the global
    RNG, seeded by one draw from ``generator`` inside a forked RNG state so the caller's stream is
    kept). ``lean`` None: decide by ``supports``."""
    if lean is None:
        lean = supports(model) and model.dtype == torch.float32
    if lean:
        return lean_decode(model, input_ids, attention_mask, max_new_tokens, eos_ids, pad_id, temperature, top_p,
                           generator)
    sampling = temperature > 0
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                  do_sample=sampling, temperature=temperature if sampling else None,
                  top_p=top_p if sampling else None, top_k=None, pad_token_id=pad_id, eos_token_id=sorted(eos_ids))
    if not sampling or generator is None:
        return model.generate(**kwargs)
    with torch.random.fork_rng(devices=[input_ids.device] if input_ids.device.type == "cuda" else []):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        return model.generate(**kwargs)
