"""``train.objective`` -> the objective a run minimises, and the data made ready for it.

    lm                      CausalLM (SFT, pre-training): train/objective.py
    dpo / kto               preference.DPO / KTO with the reference ``pref.reference``
    simpo / orpo / reward   preference.SimPO / ORPO / RewardModel (no reference)
    grpo                    grpo.GRPO: prompts and answers from SFT data; reference (grpo.beta > 0)
                            the model with its modules off, or a frozen copy where the method edits the base

Pairs train KTO too (each pair gives a desirable and an undesirable example); KTO's KL rows
pair every prompt with the previous example's completion. With ``pref.reference=precomputed``
the reference runs once over the train and eval examples here, before the first step.
"""

from __future__ import annotations

from torch import nn

from .. import registry
from ..config import Config
from ..data.preference import LabeledExample, PairExample, is_preference, unpair, with_kl_rows
from ..data.prompts import prompts_from_examples
from ..errors import ConfigError
from . import grpo_share, preference
from .grpo import GRPO
from .objective import CausalLM
from .reference import Reference, precompute, resolve_kind

PAIRED = ("dpo", "orpo", "simpo", "reward")


def prepare_data(cfg: Config, data) -> None:
    """Check that the data suits ``train.objective``; KTO's examples (and KL rows) from pairs."""
    name = cfg.train.objective
    first = data.train[0] if len(data.train) else None
    if name == "grpo":
        if is_preference(first):
            raise ConfigError("train.objective=grpo samples its own completions from prompts with reference answers: "
                              "give it SFT data (alpaca, sharegpt, messages: the last answer is the reference), "
                              f"not preference records; {cfg.data.path or 'the data'} holds preference records")
        data.train = prompts_from_examples(data.train, data.encoder.tokenizer, cfg.data.path or "the data")
        return
    if name == "lm":
        if is_preference(first):
            raise ConfigError("the data holds preference records (prompt/chosen/rejected or prompt/completion/label) "
                              "but train.objective=lm; set train.objective=dpo (or orpo, simpo, kto, reward)")
        return
    if not is_preference(first):
        raise ConfigError(f"train.objective={name} needs preference data (prompt/chosen/rejected pairs, ShareGPT "
                          f"chosen/rejected, a catalog entry with ranking: true{', or prompt/completion/label' if name == 'kto' else ''}); "
                          f"{cfg.data.path or 'the data'} holds plain conversations")
    if name in PAIRED and not isinstance(first, PairExample):
        raise ConfigError(f"train.objective={name} needs pairs (prompt/chosen/rejected); KTO's unpaired "
                          "prompt/completion/label records train only train.objective=kto")
    if name == "kto":
        data.train = with_kl_rows(unpair(data.train), cfg.data.max_length)
        data.eval = with_kl_rows(unpair(data.eval), cfg.data.max_length) if data.eval else data.eval
        assert all(isinstance(e, LabeledExample) for e in data.train)


def build_objective(cfg: Config, model: nn.Module, loss_options: dict, data=None):
    """The objective ``train.objective`` names (the reference copy, when one is needed, is made
    now: before the first step, from the model training starts with). GRPO needs ``data`` (its
    tokenizer, template and held-out prompts)."""
    name, pref = cfg.train.objective, cfg.pref
    chunk, fused = loss_options.get("chunk_rows", 1024), loss_options.get("fused", True)
    if name == "lm":
        return CausalLM(**loss_options)
    if name == "grpo":
        reference = None
        if cfg.grpo.beta != 0.0:
            reference = Reference(resolve_kind("auto", registry.get(cfg.peft.method), cfg.peft, model), model)
        share = grpo_share.resolve(cfg.grpo.share_prompt, model, cfg.peft.method, cfg.model.gradient_checkpointing,
                                   cfg.train.compile)
        return GRPO(cfg, data, reference, loss_options, share)
    if name == "simpo":
        return preference.SimPO(pref, chunk, fused)
    if name == "orpo":
        return preference.ORPO(pref, chunk, fused)
    if name == "reward":
        return preference.RewardModel(pref, model)
    method = registry.get(cfg.peft.method)
    kind = pref.reference
    if kind == "none":
        reference = Reference("none")
    else:  # precomputed: run once by what auto would run live (adapters off, or a copy freed afterwards)
        source = resolve_kind("auto" if kind == "precomputed" else kind, method, cfg.peft, model)
        reference = Reference(kind if kind == "precomputed" else source, model, source)
    cls = preference.DPO if name == "dpo" else preference.KTO
    return cls(pref, reference, chunk, fused)


def precompute_reference(objective, model: nn.Module, data, batch_size: int, device, amp) -> None:
    """``pref.reference=precomputed``: the reference log-probabilities of every example, once."""
    reference = getattr(objective, "reference", None)
    if reference is None or reference.kind != "precomputed":
        return
    for examples in (data.train, data.eval):
        if examples:
            precompute(reference, model, examples, data.collate, batch_size, device, amp, objective.chunk)
    reference.release()


def preference_eval(model: nn.Module, examples: list, collate, batch_size: int, amp, pref,
                    max_batches: int | None = None) -> dict:
    """Held-out preference metrics of a trained model (``peftlab eval``): DPO's implicit rewards
    β·(log-ratio) against the model with its modules switched off (or, for a whole model,
    reference-free: β·log-prob), their margin, the preference accuracy (chosen above rejected)
    and the DPO loss of ``pref``."""
    from ..methods.base_only import has_wrappers
    from .evaluate import evaluate_sums

    kind = "adapter_off" if has_wrappers(model) else "none"
    objective = preference.DPO(pref, Reference(kind))
    device = next(model.parameters()).device
    total, pairs = evaluate_sums(model, examples, batch_size, collate, device, amp, max_batches, objective=objective)
    out = {f"pref_{k}": v for k, v in preference.reduce_stats(objective.pop_stats(), _One(), device).items()}
    return {"pref_loss": round(total / max(pairs, 1), 6), "pref_pairs": pairs, "pref_reference": kind, **out}


class _One:
    """One process (``reduce_stats`` reduces nothing)."""

    world_size = 1
