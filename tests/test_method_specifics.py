"""Method-specific behaviour of the methods beyond LoRA, beyond what the contract checks for every
method (tests/test_contract.py): PEFT's prompt/prefix encoders and text-initialised adapters,
prompt and prefix initialisation, packed rows and gradient checkpointing with virtual tokens,
BitFit's and (IA)3's placement, MoE-LoRA's router, LISA's layer switching in the optimiser.
Tiny models use a 1,024-token vocabulary (conftest.small_model) so the file stays fast.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import SMALL_VOCAB, batch_of, perturb, small_model, train_config, with_method
from conftest import batch_logits as logits
from peftlab import registry
from peftlab.config import build_dataclass
from peftlab.errors import ConfigError
from peftlab.export.adapter import load_adapter
from peftlab.train.loss import causal_lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")

N = 3  # virtual tokens
H = 16  # encoder hidden size of the reparameterised methods
B = 8  # adapter bottleneck
OPTIONS = {  # the contract's configurations these tests start from
    "prompt_tuning": {"num_virtual_tokens": N},
    "prefix_tuning": {"num_virtual_tokens": N, "encoder_hidden_size": H},
    "p_tuning_v2": {"num_virtual_tokens": N},
    "mam": {"num_virtual_tokens": N, "encoder_hidden_size": H, "bottleneck": B},
    "bitfit": {"add_biases": True},
    "ia3": {},
    "lisa": {"layers": 1, "interval": 2},
}


def applied(method: str, arch: str, **extra):
    """(small model with ``method`` applied in its OPTIONS, Method, cfg)."""
    return with_method(small_model(arch, **extra), method, **OPTIONS[method])


# ---------------------------------------------------------------------------- parity with HF PEFT


def test_peft_text_init_adapter_loads_without_its_tokenizer(tmp_path):
    """The file's values replace the init, so a hub tokenizer named in the config is not needed."""
    from peft import PromptTuningConfig, get_peft_model

    theirs = get_peft_model(small_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
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

    model, _, _ = applied(name, arch)
    perturb(model)
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(3, SMALL_VOCAB, (k,), generator=g).tolist() for k in (5, 7, 4)]
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
    model, _, _ = applied("prompt_tuning", "llama")
    batch = batch_of(length=8)
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]] * 2)
    with pytest.raises(ConfigError, match="block mask of packed rows"):
        model(input_ids=batch["input_ids"], position_ids=packed)


def test_prefix_refuses_gradient_checkpointing():
    model, _, _ = applied("prefix_tuning", "llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ConfigError, match="gradient_checkpointing=false"):
        causal_lm_loss(model.train(), batch_of())


def test_prompt_tuning_works_with_gradient_checkpointing():
    model, _, _ = applied("prompt_tuning", "llama")
    batch = batch_of()
    expected = causal_lm_loss(model.train(), batch)[0]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss, _ = causal_lm_loss(model, batch)
    loss.backward()
    assert torch.equal(loss.detach(), expected.detach()) and model.prompt_encoder.embedding.weight.grad is not None


def test_deepcopy_keeps_the_virtual_tokens_wired():
    model, _, _ = applied("prefix_tuning", "gpt2")
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
    model, _, _ = applied("bitfit", "gpt2")
    assert model.transformer.h[0].ln_1.bias.requires_grad and not model.transformer.h[0].ln_1.weight.requires_grad


def test_ia3_scales_what_the_paper_says():
    """k and v outputs scaled row-wise, the FFN down projection's input (the intermediate activation)."""
    model, _, _ = applied("ia3", "llama")
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
    """Through the real loop step: after every switch the optimiser holds exactly what trains."""
    from peftlab.methods.lisa import schedule
    from peftlab.train.step import start_training, train_step

    model, _, cfg = applied("lisa", "llama")
    cfg.interval = 1
    batch = batch_of()
    state = start_training(model, train_config(cfg, lr=1e-3), 5)
    model.train()
    seen = set()
    for step in range(1, 6):
        assert train_step(state, [batch]) is not None
        opt = state.optimizer
        active = schedule(2, cfg, step)
        seen.update(active)
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert in_opt == trainable
        assert set(map(id, opt.state)) <= trainable  # no AdamW state for frozen layers
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
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
