"""Prompt tuning and P-tuning: n trainable virtual tokens prepended to every input.

Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning" (2021), arXiv:2104.08691.
Liu et al., "GPT Understands, Too" (P-tuning, 2021), arXiv:2103.10385.

    h = Transformer([P; E(x)]),    P ∈ R^{n×d} trainable, the model frozen
    prompt tuning:  P is a free parameter (init random, sampled vocabulary rows, or E(text))
    P-tuning:       P = MLP(P₀)  or  P = MLP(BiLSTM(P₀)),  P₀ ∈ R^{n×d}; after training the encoder
                    is folded away (``finalize``) and only P is kept, as PEFT stores it

The virtual tokens P go in front of every sequence through the shared backbone wrapper of
``methods/virtual_tokens.py`` (positions, masks, packed rows, KV-cached generation); the tensors
live at ``model.prompt_encoder`` and are saved as PEFT's ``prompt_embeddings`` [n, d].

Cannot merge (the virtual tokens are inputs, not weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..model.params import freeze
from ..registry import Method, register
from .virtual_tokens import (
    ENCODER_KEY,
    attach_virtual_tokens,
    check_init,
    check_single_stack,
    common_peft_config,
    finalize,
    from_file_keys,
    init_token_ids,
    model_dims,
    to_file_keys,
)

ENCODERS = ("mlp", "lstm")


@dataclass
class PromptTuningConfig:
    default_lr = 3e-2  # train.lr when unset (not a key): docs/results.md §2b
    method: str = "prompt_tuning"
    num_virtual_tokens: int = 20
    init: str = "random"  # random (N(0, σ_E²), σ_E the embeddings' std) | vocab (random rows of E) | text
    init_text: str | None = None  # for init=text: repeated/cut to n tokens, P = E(tokens)
    tokenizer: str | None = None  # for init=text (default: the model's own directory)

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"peft.num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        check_init(self)


@dataclass
class PTuningConfig:
    method: str = "p_tuning"
    num_virtual_tokens: int = 20
    encoder: str = "mlp"  # mlp | lstm (bi-LSTM + MLP, as in the paper)
    encoder_hidden_size: int | None = None  # default: the model's hidden size
    encoder_num_layers: int = 2  # LSTM layers
    encoder_dropout: float = 0.0  # between LSTM layers

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"peft.num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"peft.encoder {self.encoder!r} is not one of {', '.join(ENCODERS)}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ConfigError(f"peft.encoder_hidden_size must be >= 1, got {self.encoder_hidden_size}")


class PromptEncoder(nn.Module):
    """Produces the virtual tokens P [n, d].

    kind ``none``: P = embedding.weight (prompt tuning, or a folded P-tuning encoder).
    kind ``mlp``:  P = mlp_head(P₀), mlp_head = Linear(d, h) ReLU Linear(h, h) ReLU Linear(h, d).
    kind ``lstm``: P = mlp_head(BiLSTM(P₀)), mlp_head = Linear(2h, 2h) ReLU Linear(2h, d).
    Module names and shapes are PEFT's (``embedding``, ``lstm_head``, ``mlp_head``), so PEFT's
    encoder weights load into it unchanged. fp32 on the model's device.
    """

    def __init__(self, n: int, d: int, kind: str = "none", hidden: int | None = None, lstm_layers: int = 2,
                 dropout: float = 0.0, device=None):
        super().__init__()
        self.kind = kind
        h = hidden or d
        self.embedding = nn.Embedding(n, d, device=device)
        if kind == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(d, h, device=device), nn.ReLU(), nn.Linear(h, h, device=device),
                                          nn.ReLU(), nn.Linear(h, d, device=device))
        elif kind == "lstm":
            self.lstm_head = nn.LSTM(d, h, num_layers=lstm_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True, device=device)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, device=device), nn.ReLU(),
                                          nn.Linear(2 * h, d, device=device))

    def forward(self) -> torch.Tensor:
        """P [n, d]."""
        x = self.embedding.weight
        if self.kind == "none":
            return x
        x = x.unsqueeze(0)
        if self.kind == "lstm":
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]

    def virtual_embeddings(self, batch_size: int) -> torch.Tensor:
        """[B, n, d]: the same virtual tokens for every row."""
        p = self.forward()
        return p.unsqueeze(0).expand(batch_size, *p.shape)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the encoder by its output: afterwards kind is ``none`` and P is a plain parameter."""
        if self.kind == "none":
            return
        out = self.forward().detach().clone()
        for name in ("mlp_head", "lstm_head"):
            if hasattr(self, name):
                delattr(self, name)
        self.embedding.weight = nn.Parameter(out, requires_grad=self.embedding.weight.requires_grad)
        self.kind = "none"


def _init_prompt(enc: PromptEncoder, model: nn.Module, cfg: PromptTuningConfig) -> None:
    weight = model.get_input_embeddings().weight
    if weight.is_meta:  # shapes only (peftlab params): nothing to initialise
        return
    n = enc.embedding.num_embeddings
    with torch.no_grad():
        if cfg.init == "random":
            enc.embedding.weight.normal_(0.0, float(weight.float().std()))
        else:
            rows = torch.tensor(init_token_ids(model, n, cfg), device=weight.device)
            enc.embedding.weight.copy_(weight[rows].float())


def apply_prompt_tuning(model: nn.Module, cfg: PromptTuningConfig) -> None:
    freeze(model)
    dims = model_dims(model)
    weight = model.get_input_embeddings().weight
    enc = PromptEncoder(cfg.num_virtual_tokens, dims["d"], device=weight.device)
    _init_prompt(enc, model, cfg)
    attach_virtual_tokens(model, enc, cfg.num_virtual_tokens, prompts=enc.virtual_embeddings)


def apply_p_tuning(model: nn.Module, cfg: PTuningConfig) -> None:
    freeze(model)
    dims = model_dims(model)
    weight = model.get_input_embeddings().weight
    enc = PromptEncoder(cfg.num_virtual_tokens, dims["d"], cfg.encoder, cfg.encoder_hidden_size,
                        cfg.encoder_num_layers, cfg.encoder_dropout, device=weight.device)
    attach_virtual_tokens(model, enc, cfg.num_virtual_tokens, prompts=enc.virtual_embeddings)


# ---------------------------------------------------------------------------- adapter files


def prompt_tuning_to_peft(cfg: PromptTuningConfig, model: nn.Module) -> dict:
    out = common_peft_config(model, "PROMPT_TUNING", cfg.num_virtual_tokens)
    out["prompt_tuning_init"] = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}[cfg.init]
    out["prompt_tuning_init_text"] = cfg.init_text
    out["tokenizer_name_or_path"] = cfg.tokenizer
    return out


def p_tuning_to_peft(cfg: PTuningConfig, model: nn.Module) -> dict:
    out = common_peft_config(model, "P_TUNING", cfg.num_virtual_tokens)
    out.update({"encoder_reparameterization_type": cfg.encoder.upper(),
                "encoder_hidden_size": cfg.encoder_hidden_size or model_dims(model)["d"],
                "encoder_num_layers": cfg.encoder_num_layers, "encoder_dropout": cfg.encoder_dropout})
    return out


def prompt_tuning_from_peft(d: dict) -> PromptTuningConfig:
    """The loaded file replaces any init, so PEFT's TEXT init (and its hub tokenizer) is not replayed."""
    check_single_stack(d)
    return PromptTuningConfig(num_virtual_tokens=int(d["num_virtual_tokens"]))


def p_tuning_from_peft(d: dict) -> PTuningConfig:
    check_single_stack(d)
    return PTuningConfig(num_virtual_tokens=int(d["num_virtual_tokens"]),
                         encoder=str(d.get("encoder_reparameterization_type", "MLP")).lower(),
                         encoder_hidden_size=d.get("encoder_hidden_size"),
                         encoder_num_layers=int(d.get("encoder_num_layers", 2)),
                         encoder_dropout=float(d.get("encoder_dropout", 0.0) or 0.0))


register(Method(
    name="prompt_tuning", config_cls=PromptTuningConfig, apply=apply_prompt_tuning, merge=None,
    peft_type="PROMPT_TUNING", state_prefixes=(ENCODER_KEY,), to_peft_config=prompt_tuning_to_peft,
    from_peft_config=prompt_tuning_from_peft, to_peft_keys=to_file_keys, from_peft_keys=from_file_keys,
    finalize=finalize,
))
register(Method(
    name="p_tuning", config_cls=PTuningConfig, apply=apply_p_tuning, merge=None, peft_type="P_TUNING",
    state_prefixes=(ENCODER_KEY,), to_peft_config=p_tuning_to_peft, from_peft_config=p_tuning_from_peft,
    to_peft_keys=to_file_keys, from_peft_keys=from_file_keys, finalize=finalize,
    param_extra=lambda model, cfg: {"saved_params": cfg.num_virtual_tokens * model_dims(model)["d"]},
))
