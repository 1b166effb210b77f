"""Contracts of the methods beyond LoRA, and parity with Hugging Face PEFT 0.21.

``CASES`` lists one entry per method configuration, in the shape of the shared contract suite
(each entry: the method and its options, whether it is the identity at init, whether it merges,
a closed-form trainable-parameter count computed from the model config, and the names that must
train). The contracts run over every entry and both tiny architectures:

1. identity at init where promised (bit-equal logits), a visible change where not;
2. exactly the expected parameters train, and their count equals the closed-form formula;
3. save -> load into a fresh model gives bit-identical logits (and PEFT's file names);
4. merge == unmerged within 1e-5 (fp32) after every trainable tensor is perturbed, for mergeable
   methods; the others raise a clear error from ``peftlab.api.merge``;
5. it learns: the loss on one small batch falls below a fraction of where it started;
6. greedy generation of a batched, left-padded prompt set with the KV cache equals generation
   without the cache and each prompt generated alone.

Logit parity with PEFT (both directions of the adapter files) covers prompt tuning, P-tuning,
prefix tuning, P-tuning v2 and (IA)3. Tiny models use a 1,024-token vocabulary here so that the
whole file stays fast; merge tests use ``initializer_range=0.02`` (a well-conditioned model, where
fp32 rounding does not blow up through the layers).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from conftest import tiny_model_config
from peftlab import api, registry
from peftlab.config import build_dataclass
from peftlab.errors import ConfigError
from peftlab.export.adapter import WEIGHTS_NAME, load_adapter, save_adapter
from peftlab.model.load import load_model
from peftlab.train.loss import causal_lm_loss

VOCAB = 1024
N = 3  # virtual tokens in the prompt/prefix cases
H = 16  # encoder hidden size in the reparameterised cases
B = 8  # adapter bottleneck
R = 4  # MoE expert rank


def safe_open_keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def small_model(arch: str, seed: int = 0, **extra):
    if arch == "gpt2":  # GPT-2's special ids (50256) do not exist in the small vocabulary
        extra = {"bos_token_id": 0, "eos_token_id": 0, **extra}
    model, _ = load_model(tiny_model_config(arch, vocab=VOCAB, **extra), seed=seed, with_tokenizer=False)
    return model


def dims(model) -> dict:
    """The facts the formulas need, read from the HF config (not from peftlab)."""
    c = model.config
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = c.hidden_size // heads
    ff = getattr(c, "intermediate_size", None) or (c.n_inner or 4 * c.hidden_size)
    return {"d": c.hidden_size, "L": c.num_hidden_layers, "t": kv * hd, "ff": ff, "V": c.vocab_size,
            "P": getattr(c, "n_positions", 0), "llama": c.model_type == "llama"}


def linears(D: dict) -> list[tuple[int, int]]:
    """(in, out) of the linear layers of one decoder layer."""
    d, t, ff = D["d"], D["t"], D["ff"]
    if D["llama"]:
        return [(d, d), (d, t), (d, t), (d, d), (d, ff), (d, ff), (ff, d)]
    return [(d, 3 * d), (d, d), (d, ff), (ff, d)]


def prefix_count(D: dict, h: int | None) -> int:
    t, L = D["t"], D["L"]
    return N * 2 * L * t if h is None else N * t + t * h + h + h * 2 * L * t + 2 * L * t


def adapter_count(D: dict, sites: int) -> int:
    d = D["d"]
    return D["L"] * sites * (2 * d * B + B + d)


def lstm_count(D: dict) -> int:
    d, h = D["d"], H
    lstm = 2 * (4 * h * d + 4 * h * h + 8 * h) + 2 * (4 * h * 2 * h + 4 * h * h + 8 * h)
    return N * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)


def layer_count(D: dict) -> int:
    d = D["d"]
    norms = 2 * d if D["llama"] else 4 * d
    biases = 0 if D["llama"] else sum(o for _, o in linears(D))
    return sum(i * o for i, o in linears(D)) + biases + norms


def outside_count(D: dict) -> int:  # tied embeddings/head, final norm, (GPT-2) position embeddings
    return D["V"] * D["d"] + (D["d"] if D["llama"] else D["P"] * D["d"] + 2 * D["d"])


def moe_count(D: dict, experts: list[int]) -> int:
    return sum(n * (R * (i + o) + i) for n in experts for i, o in linears(D))


def ia3_count(D: dict) -> int:
    return D["L"] * ((2 * D["t"] if D["llama"] else 3 * D["d"]) + D["ff"])


def bitfit_count(D: dict) -> int:
    if D["llama"]:  # zero biases added to every linear layer
        return D["L"] * sum(o for _, o in linears(D))
    return D["L"] * (sum(o for _, o in linears(D)) + 2 * D["d"]) + D["d"]


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    options: dict
    identity: bool  # output == base output at init
    mergeable: bool
    count: Callable[[dict], int]  # closed-form trainable parameters
    names: str  # regex every trainable parameter name must match
    lr: float = 1e-2
    learns_to: float = 0.5  # final / initial loss on one batch after STEPS steps must be below this
    archs: tuple[str, ...] = ("llama", "gpt2")
    extra: dict = field(default_factory=dict)


PROMPT_NAMES = r"prompt_encoder\..+"
CASES = [
    Case("prompt_tuning", "prompt_tuning", {"num_virtual_tokens": N}, False, False,
         lambda D: N * D["d"], PROMPT_NAMES, lr=0.3, learns_to=0.8),
    Case("p_tuning_mlp", "p_tuning", {"num_virtual_tokens": N}, False, False,
         lambda D: N * D["d"] + 3 * (D["d"] ** 2 + D["d"]), PROMPT_NAMES, lr=1e-2, learns_to=0.8),
    Case("p_tuning_lstm", "p_tuning", {"num_virtual_tokens": N, "encoder": "lstm", "encoder_hidden_size": H},
         False, False, lstm_count, PROMPT_NAMES, lr=1e-2, learns_to=0.8),
    Case("prefix_tuning", "prefix_tuning", {"num_virtual_tokens": N, "encoder_hidden_size": H}, False, False,
         lambda D: prefix_count(D, H), PROMPT_NAMES, lr=5e-2, learns_to=0.8),
    Case("prefix_tuning_vocab_init", "prefix_tuning", {"num_virtual_tokens": N, "encoder_hidden_size": H,
                                                       "init": "vocab"}, False, False,
         lambda D: prefix_count(D, H), PROMPT_NAMES, lr=5e-2, learns_to=0.8, archs=("llama",)),
    Case("p_tuning_v2", "p_tuning_v2", {"num_virtual_tokens": N}, False, False,
         lambda D: prefix_count(D, None), PROMPT_NAMES, lr=0.1, learns_to=0.8),
    Case("adapter_serial", "adapter", {"bottleneck": B}, True, False,
         lambda D: adapter_count(D, 2), r".+\.adapter_(down|up)\.(weight|bias)"),
    Case("adapter_parallel", "adapter", {"bottleneck": B, "placement": "parallel", "scaling": 4.0}, True, False,
         lambda D: adapter_count(D, 2), r".+\.adapter_(down|up)\.(weight|bias)"),
    Case("mam", "mam", {"num_virtual_tokens": N, "encoder_hidden_size": H, "bottleneck": B}, False, False,
         lambda D: adapter_count(D, 1) + prefix_count(D, H), r"prompt_encoder\..+|.+\.mlp\.adapter_(down|up)\..+",
         lr=5e-2, learns_to=0.6),
    Case("ia3", "ia3", {}, True, True, ia3_count, r".+\.ia3_l", lr=0.1, learns_to=0.6),
    Case("bitfit", "bitfit", {"add_biases": True}, True, True, bitfit_count, r".+\.bias", lr=0.1, learns_to=0.7),
    Case("lisa", "lisa", {"layers": 1, "interval": 2}, True, True,
         lambda D: outside_count(D) + layer_count(D), r"(?!.*\.(layers|h)\.\d+\.).+|.+\.(layers|h)\.{active}\..+",
         lr=3e-3, learns_to=0.3),
    Case("moe_lora_soft", "moe_lora", {"r": R, "num_experts": 3}, True, False,
         lambda D: moe_count(D, [3] * D["L"]), r".+\.moe_(A|B|router)\.weight", learns_to=0.1),
    Case("moe_lora_top2", "moe_lora", {"r": R, "num_experts": [2, 3], "top_k": 2}, True, False,
         lambda D: moe_count(D, [2, 3]), r".+\.moe_(A|B|router)\.weight", learns_to=0.1),
]
PARAMS = [pytest.param(c, a, id=f"{c.id}-{a}") for c in CASES for a in c.archs]
STEPS = 20


def peft_cfg(case: Case):
    method = registry.get(case.method)
    return method, build_dataclass(method.config_cls, {"method": case.method, **case.options}, "peft")


def applied(case: Case, arch: str, **extra):
    model = small_model(arch, **extra)
    method, cfg = peft_cfg(case)
    torch.manual_seed(0)
    method.apply(model, cfg)
    return model, method, cfg


def perturb(model, std: float = 0.05, seed: int = 1) -> None:
    """Move every trainable tensor off its init (zero B / up, ones (IA)3, zero biases, ...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def batch_of(seed: int = 0, rows: int = 2, length: int = 12) -> dict:
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@torch.no_grad()
def logits(model, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ---------------------------------------------------------------------------- the six contracts


@pytest.mark.parametrize("case,arch", PARAMS)
def test_identity_at_init(case, arch):
    base = small_model(arch)
    model, _, _ = applied(case, arch)
    batch = batch_of()
    same = torch.equal(logits(model, batch), logits(base, batch))
    assert same == case.identity, "identity at init" if case.identity else "virtual tokens must change the output"


@pytest.mark.parametrize("case,arch", PARAMS)
def test_trainable_names_and_count(case, arch):
    model, _, _ = applied(case, arch)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    pattern = case.names
    if "{active}" in pattern:  # LISA: exactly one layer's tensors train, besides everything outside the layers
        active = {m.group(2) for n in trainable if (m := re.match(r".*\.(layers|h)\.(\d+)\.", n))}
        assert len(active) == case.options["layers"]
        pattern = pattern.replace("{active}", active.pop())
        frozen_outside = [n for n, p in model.named_parameters()
                          if not p.requires_grad and not re.match(r".*\.(layers|h)\.\d+\.", n)]
        assert not frozen_outside
    bad = [n for n in trainable if not re.fullmatch(pattern, n)]
    assert not bad, f"unexpected trainable tensors: {bad[:5]}"
    assert sum(trainable.values()) == case.count(dims(model))
    assert api.param_report(model).trainable == case.count(dims(model))


@pytest.mark.parametrize("case,arch", PARAMS)
def test_save_load_bit_identical(case, arch, tmp_path):
    model, method, cfg = applied(case, arch)
    perturb(model)
    if method.finalize is not None:
        before = logits(model, batch_of())
        method.finalize(model, cfg)
        assert torch.equal(logits(model, batch_of()), before), "folding the encoder changed the output"
    batch = batch_of(seed=3)
    expected = logits(model, batch)
    fresh = small_model(arch)  # the same base; the method's tensors can only come from the file
    if method.peft_type is None:  # LISA: a whole model, like full fine-tuning
        from peftlab.config import ModelConfig, load_config
        from peftlab.train.loop import save_artifact

        run_cfg = load_config(None, [f"peft.method={case.method}"])
        out = save_artifact(model, None, run_cfg, tmp_path)
        fresh, _ = load_model(ModelConfig(name=str(out)), with_tokenizer=False)
    else:
        save_adapter(model, cfg, tmp_path / "a")
        load_adapter(fresh, tmp_path / "a")
        config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
        assert config["peft_type"] == method.peft_type
        keys = set(safe_open_keys(tmp_path / "a" / WEIGHTS_NAME))
        prompt_keys = {"prompt_embeddings"} if hasattr(model, "prompt_encoder") else set()
        assert prompt_keys <= keys  # PEFT's names: the folded virtual tokens, the rest under PEFT's prefix
        assert all(k.startswith("base_model.model.") for k in keys - prompt_keys)
    assert torch.equal(logits(fresh, batch), expected)


@pytest.mark.parametrize("case,arch", PARAMS)
def test_merge(case, arch, tmp_path):
    model, method, cfg = applied(case, arch, initializer_range=0.02)
    if not case.mergeable:
        with pytest.raises(ConfigError, match="cannot be merged"):
            api.merge(model, cfg)
        return
    perturb(model)
    batch = batch_of()
    before = logits(model, batch)
    api.merge(model, cfg)
    torch.testing.assert_close(logits(model, batch), before, atol=1e-5, rtol=0)
    leftovers = [type(m).__name__ for m in model.modules() if type(m).__module__.startswith("peftlab")]
    assert not leftovers, f"merge left method modules behind: {set(leftovers)}"
    # The merged model is a plain HF model: it saves and reloads as one (BitFit's added biases too).
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded, batch), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case,arch", PARAMS)
def test_overfits_one_batch(case, arch):
    from peftlab.config import TrainConfig
    from peftlab.train.optim import build_optimizer

    model, method, cfg = applied(case, arch)
    batch = batch_of()
    opt = build_optimizer(model, method, cfg, TrainConfig(lr=case.lr))
    model.train()
    losses = []
    for step in range(1, STEPS + 1):
        loss_sum, n = causal_lm_loss(model, batch)
        aux = method.aux_loss(model, cfg, batch) if method.aux_loss is not None else None
        ((loss_sum + (aux * n if aux is not None else 0)) / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if method.on_step is not None:
            method.on_step(model, cfg, step, opt)
        losses.append(float(loss_sum.detach()) / n)
    assert losses[-1] < case.learns_to * losses[0], f"{losses[0]:.3f} -> {losses[-1]:.3f}"


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


@pytest.mark.parametrize("case,arch", PARAMS)
def test_generation_cache_padding(case, arch):
    model, _, _ = applied(case, arch)
    perturb(model, std=0.2)
    model.eval()
    prompts = [[11, 12, 13, 14, 15, 16], [21, 22, 23], [31, 32, 33, 34]]
    ids, mask = left_padded(prompts)
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
        uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)[:, ids.shape[1]:]
        alone = [model.generate(input_ids=torch.tensor([p]), **kw)[0, len(p):].tolist() for p in prompts]
    assert cached.tolist() == uncached.tolist() == alone


# ---------------------------------------------------------------------------- parity with HF PEFT


def peft_config_for(name: str):
    import peft

    return {
        "prompt_tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
        "p_tuning_mlp": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
        "p_tuning_lstm": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                          encoder_reparameterization_type="LSTM",
                                                          encoder_hidden_size=H),
        "prefix_tuning": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                         prefix_projection=True, encoder_hidden_size=H),
        "p_tuning_v2": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
        "ia3": lambda: peft.IA3Config(task_type="CAUSAL_LM"),
    }[name]()


PARITY = [pytest.param(c, a, id=f"{c.id}-{a}") for c in CASES if c.id in
          ("prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "prefix_tuning", "p_tuning_v2", "ia3") for a in c.archs]


def real_token_logits(out: torch.Tensor, t: int) -> torch.Tensor:
    return out[:, -t:]  # PEFT's prompt tuning returns logits for the virtual positions too


@pytest.mark.parametrize("case,arch", PARITY)
def test_peft_loads_our_adapter(case, arch, tmp_path):
    from peft import PeftModel

    model, method, cfg = applied(case, arch, initializer_range=0.02)  # well-conditioned: 1e-5 is meaningful
    perturb(model)
    if method.finalize is not None:
        method.finalize(model, cfg)
    save_adapter(model, cfg, tmp_path)
    theirs = PeftModel.from_pretrained(small_model(arch, initializer_range=0.02), tmp_path)
    batch = batch_of()
    batch["attention_mask"][1, 8:] = 0  # right padding, as in training
    keep = batch["attention_mask"].bool()
    ours = logits(model, batch)
    with torch.no_grad():
        ref = real_token_logits(theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, 12)
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case,arch", PARITY)
def test_we_load_peft_adapter(case, arch, tmp_path):
    from peft import get_peft_model

    theirs = get_peft_model(small_model(arch, initializer_range=0.02), peft_config_for(case.id))
    perturb(theirs)  # PEFT initialises (IA)3 at ones; move everything off its init
    theirs.save_pretrained(tmp_path)
    ours = small_model(arch, initializer_range=0.02)
    cfg = load_adapter(ours, tmp_path)
    assert cfg.method == case.method
    batch = batch_of(seed=5)
    theirs.eval()
    with torch.no_grad():
        ref = real_token_logits(theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, 12)
    torch.testing.assert_close(logits(ours, batch), ref, atol=1e-5, rtol=1e-5)


def test_peft_text_init_adapter_loads_without_its_tokenizer(tmp_path):
    """The file's values replace the init, so a hub tokenizer named in the config is not needed."""
    from peft import get_peft_model

    theirs = get_peft_model(small_model("llama"), peft_config_for("prompt_tuning"))
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.update(prompt_tuning_init="TEXT", prompt_tuning_init_text="Classify:",
                  tokenizer_name_or_path="some-org/not-on-this-machine")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    ours = small_model("llama")
    load_adapter(ours, tmp_path)
    assert torch.equal(ours.prompt_encoder.embedding.weight, theirs.prompt_encoder["default"].embedding.weight)


@pytest.mark.parametrize("kind", ["MLP", "LSTM", "PREFIX"])
def test_encoders_match_peft_with_same_weights(kind):
    """The trainable reparameterisations compute what PEFT's do (before folding)."""
    import peft
    from peft.tuners.p_tuning.model import PromptEncoder as TheirPromptEncoder
    from peft.tuners.prefix_tuning.model import PrefixEncoder as TheirPrefixEncoder

    from peftlab.methods.prefix import PrefixEncoder
    from peftlab.methods.prompt import PromptEncoder

    d, layers, kv, hd = 32, 3, 2, 8
    if kind == "PREFIX":
        pc = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, token_dim=kv * hd, num_layers=layers,
                                     num_attention_heads=kv, encoder_hidden_size=H, prefix_projection=True)
        theirs, ours = TheirPrefixEncoder(pc), PrefixEncoder(N, layers, kv, hd, True, H)
    else:
        pc = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, token_dim=d, num_layers=layers,
                                      num_attention_heads=4, encoder_hidden_size=H, num_transformer_submodules=1,
                                      encoder_reparameterization_type=kind)
        theirs, ours = TheirPromptEncoder(pc), PromptEncoder(N, d, kind.lower(), H)
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours(), theirs(torch.arange(N)[None])[0], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning"])
def test_generate_matches_peft(name, tmp_path):
    """Greedy generation (KV cache on) equals PEFT's for an unpadded prompt."""
    from peft import PeftModel

    case = next(c for c in CASES if c.id == name)
    model, method, cfg = applied(case, "llama")
    perturb(model, std=0.2)
    if method.finalize is not None:
        method.finalize(model, cfg)
    save_adapter(model, cfg, tmp_path)
    theirs = PeftModel.from_pretrained(small_model("llama"), tmp_path).eval()
    ids = torch.tensor([[11, 12, 13, 14, 15]])
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.no_grad():
        ref = theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        out = model.eval().generate(input_ids=ids, **kw)
    assert out[0, 5:].tolist() == ref[0, -6:].tolist()


# ---------------------------------------------------------------------------- method specifics


def test_prompt_init_from_text_and_vocab():
    from conftest import tiny_model

    model, tok = tiny_model("gpt2")
    emb = model.get_input_embeddings().weight.detach().clone()
    method = registry.get("prompt_tuning")
    cfg = build_dataclass(method.config_cls, {"method": "prompt_tuning", "num_virtual_tokens": 5, "init": "text",
                                              "init_text": "Hello world", "tokenizer": "gpt2"}, "peft")
    method.apply(model, cfg)
    ids = tok("Hello world", add_special_tokens=False).input_ids  # [15496, 995], repeated to 5 tokens
    assert torch.equal(model.prompt_encoder.embedding.weight, emb[(ids * 3)[:5]])
    vocab_model = small_model("llama")
    rows = vocab_model.get_input_embeddings().weight.detach()
    registry.get("prompt_tuning").apply(vocab_model, build_dataclass(method.config_cls, {"init": "vocab"}, "peft"))
    p = vocab_model.prompt_encoder.embedding.weight
    assert all(any(torch.equal(r, e) for e in rows) for r in p)


@pytest.mark.parametrize("method", ["prefix_tuning", "p_tuning_v2", "mam"])
def test_prefix_init_from_text_equals_the_text_prepended(method, arch):
    """init=text: at step 0 the prefix makes the model behave exactly as if the text came first."""
    from conftest import tiny_model

    model, tok = tiny_model(arch, initializer_range=0.02)
    base = copy.deepcopy(model)
    name = "gpt2" if arch == "gpt2" else "smollm2-135m"
    m = registry.get(method)
    extra = {"bottleneck": B, "encoder_hidden_size": H} if method == "mam" else {}
    cfg = build_dataclass(m.config_cls, {"method": method, "num_virtual_tokens": 5, "init": "text",
                                         "init_text": "Hello world", "tokenizer": name, **extra}, "peft")
    m.apply(model, cfg)
    text = tok("Hello world", add_special_tokens=False).input_ids
    text = torch.tensor([(text * 5)[:5]] * 2)
    x = batch_of()["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=x).logits
        ref = base(input_ids=torch.cat([text, x], dim=1)).logits[:, 5:]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning_v2", "mam"])
def test_packed_rows_equal_unpacked(name, arch):
    """Each packed sequence sees the virtual tokens and itself at n + i: loss == the unpacked loss."""
    from peftlab.data.collate import collate
    from peftlab.data.tokenize import Example

    model, _, _ = applied(next(c for c in CASES if c.id == name), arch)
    perturb(model)
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in (5, 7, 4)]
    examples = [Example(s, list(s)) for s in seqs]
    unpacked = collate(examples, pad_id=0)
    row = Example(sum(seqs, []), sum(seqs, []), seq_lens=tuple(map(len, seqs)))
    packed = collate([row, Example(seqs[0], list(seqs[0]))], pad_id=0, packed=True)
    model.eval()
    with torch.no_grad():
        a, n_a = causal_lm_loss(model, unpacked)
        b, n_b = causal_lm_loss(model, packed)
        single, n_s = causal_lm_loss(model, collate(examples[:1], pad_id=0))
    assert n_b == n_a + n_s
    torch.testing.assert_close(b, a + single, atol=1e-3, rtol=1e-5)


def test_prompt_methods_refuse_mask_free_packing():
    model, _, _ = applied(CASES[0], "llama")
    batch = batch_of(length=8)
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]] * 2)
    with pytest.raises(ConfigError, match="block mask of packed rows"):
        model(input_ids=batch["input_ids"], position_ids=packed)


def test_prefix_refuses_gradient_checkpointing():
    model, _, _ = applied(next(c for c in CASES if c.id == "prefix_tuning"), "llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ConfigError, match="gradient_checkpointing=false"):
        causal_lm_loss(model.train(), batch_of())


def test_prompt_tuning_works_with_gradient_checkpointing():
    model, _, _ = applied(CASES[0], "llama")
    batch = batch_of()
    expected = causal_lm_loss(model.train(), batch)[0]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss, _ = causal_lm_loss(model, batch)
    loss.backward()
    assert torch.equal(loss.detach(), expected.detach()) and model.prompt_encoder.embedding.weight.grad is not None


def test_deepcopy_keeps_the_virtual_tokens_wired():
    model, _, _ = applied(next(c for c in CASES if c.id == "prefix_tuning"), "gpt2")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.prompt_encoder.embedding.weight.add_(1.0)
    batch = batch_of()
    assert not torch.equal(logits(twin, batch), logits(model, batch))  # the copy uses its own prefix


def test_bitfit_on_bias_free_model_says_so():
    model = small_model("llama")
    with pytest.raises(ConfigError, match=r"no bias parameters.*peft.add_biases=true"):
        registry.get("bitfit").apply(model, build_dataclass(registry.get("bitfit").config_cls, {}, "peft"))


def test_bitfit_trains_layernorm_beta():
    model, _, _ = applied(next(c for c in CASES if c.id == "bitfit"), "gpt2")
    assert model.transformer.h[0].ln_1.bias.requires_grad and not model.transformer.h[0].ln_1.weight.requires_grad


def test_ia3_scales_what_the_paper_says():
    """k and v outputs scaled row-wise, the FFN down projection's input (the intermediate activation)."""
    model, _, _ = applied(next(c for c in CASES if c.id == "ia3"), "llama")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.k_proj.ia3_l.shape == (attn.k_proj.base_layer.out_features, 1) and not attn.k_proj.feedforward
    assert mlp.down_proj.ia3_l.shape == (1, mlp.down_proj.base_layer.in_features) and mlp.down_proj.feedforward
    assert not hasattr(attn.q_proj, "ia3_l")


def test_moe_router_load_balancing_formula():
    from peftlab.methods.moe_lora import MoELoRALinear, aux_loss

    torch.manual_seed(0)
    layer = MoELoRALinear(torch.nn.Linear(16, 8), num_experts=4, r=2, alpha=4.0, top_k=2)
    holder = torch.nn.Sequential(layer).train()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    holder(x)
    got = aux_loss(holder, build_dataclass(registry.get("moe_lora").config_cls, {"aux_loss_coef": 1.0}, "peft"),
                   {"attention_mask": mask})
    logits_ = (x @ layer.moe_router.weight.T)[mask.bool()]  # [8 real tokens, 4]
    probs = logits_.softmax(-1)
    top = logits_.topk(2, -1).indices
    f = torch.zeros(4).index_add_(0, top.flatten(), torch.ones(top.numel())) / top.numel()
    torch.testing.assert_close(got, 4 * (f * probs.mean(0)).sum())
    # a uniform router sends every top-1 choice to expert 0: f = e_0, P = 1/N, so N·Σ f P = 1
    soft = MoELoRALinear(torch.nn.Linear(16, 8), num_experts=3, r=2, alpha=4.0)
    torch.nn.init.zeros_(soft.moe_router.weight)
    holder = torch.nn.Sequential(soft).train()
    holder(x)
    got = aux_loss(holder, build_dataclass(registry.get("moe_lora").config_cls, {"aux_loss_coef": 1.0}, "peft"), {})
    torch.testing.assert_close(got, torch.tensor(1.0))


def test_moe_experts_per_layer_groups():
    from peftlab.methods.moe_lora import experts_per_layer

    assert experts_per_layer([2, 4, 6, 8], 8) == [2, 2, 4, 4, 6, 6, 8, 8]
    assert experts_per_layer(3, 4) == [3, 3, 3, 3]
    assert experts_per_layer([1, 2, 3], 30) == [1] * 10 + [2] * 10 + [3] * 10
    with pytest.raises(ConfigError, match="num_experts has 3 entries"):
        experts_per_layer([1, 2, 3], 2)


def test_lisa_switches_layers_and_optimizer_state():
    from peftlab.config import TrainConfig
    from peftlab.methods.lisa import schedule
    from peftlab.train.optim import build_optimizer

    case = next(c for c in CASES if c.id == "lisa")
    model, method, cfg = applied(case, "llama")
    cfg.interval = 1
    batch = batch_of()
    opt = build_optimizer(model, method, cfg, TrainConfig(lr=1e-3))
    seen = set()
    for step in range(1, 6):
        loss, n = causal_lm_loss(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_step(model, cfg, step, opt)
        active = schedule(2, cfg, step)
        seen.update(active)
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert in_opt == trainable
        assert set(map(id, opt.state)) <= trainable  # no AdamW state for frozen layers
        layer_params = {id(p) for p in model.model.layers[active[0]].parameters()}
        assert layer_params <= trainable and not ({id(p) for p in model.model.layers[1 - active[0]].parameters()}
                                                  & trainable)
    assert seen == {0, 1}


def test_moe_token_mask_of_packed_rows():
    from peftlab.data.collate import block_causal_mask
    from peftlab.methods.moe_lora import _token_mask

    mask = block_causal_mask([(2, 3), (4,)], 6)
    assert _token_mask({"attention_mask": mask}, torch.Size([2, 6])).tolist() == [[True] * 5 + [False],
                                                                                  [True] * 4 + [False] * 2]
