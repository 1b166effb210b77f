"""The method registry: the one piece of global state in peftlab.

A method family registers itself from its own file (``methods/<name>.py``) with one
``register(Method(...))`` call. Everything else — config parsing, ``peftlab params``, the
training loop, adapter files — looks methods up here, so adding a method touches only its
file, its docs section and the contract-test list.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .errors import ConfigError

PEFT_PREFIX = "base_model.model."


def add_peft_prefix(state: dict) -> dict:
    """peftlab module names -> PEFT's file names (``base_model.model.`` + path)."""
    return {PEFT_PREFIX + k: v for k, v in state.items()}


def strip_peft_prefix(state: dict) -> dict:
    return {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}


@dataclass
class StepEffects:
    """What a method's ``on_step`` asks the loop to do after optimiser step ``step``.

    The method changes only the model; these are the optimiser's consequences, carried out by
    the loop (``train/optim.py``), so no method reaches into the optimiser or the scheduler.

    metrics:  added to the step's metrics record (e.g. MoE router statistics).
    regroup:  the trainable set changed: the optimiser's groups are re-pointed at the parameters
              that now train (grouped as at the start: the method's ``param_groups`` or the
              default), and parameters that left lose their AdamW state (LISA).
    prune:    ``(params, fraction)``: zero this fraction of these parameters' AdamW moments,
              smallest |m| first, both moments at the same positions (ReLoRA's restart).
    lr_scale: multiply the learning rate of the next step (ReLoRA's re-warm-up); the schedule
              sets it afresh the step after.
    reset:    these parameters' AdamW state is dropped (moments and step count): the next step
              starts them as a fresh optimiser would (Chain of LoRA's and PeriodicLoRA's restarts).
    """

    metrics: dict = field(default_factory=dict)
    regroup: bool = False
    prune: tuple[list[Tensor], float] | None = None
    lr_scale: float = 1.0
    reset: list[Tensor] | None = None


@dataclass(frozen=True)
class Method:
    """How one ``peft.method`` plugs into peftlab.

    name:         the value users type as ``peft.method``.
    config_cls:   dataclass of the method's options (its first field is ``method``).
    apply:        ``apply(model, cfg) -> None``: freeze the base, insert the method's modules,
                  in place. Trainable parameters are exactly those left with requires_grad.
    merge:        ``merge(model) -> None`` folds the method into plain modules, or None when the
                  math does not allow it (export then raises a clear error).
    peft_type:    the ``peft_type`` written to adapter_config.json (PEFT's name where PEFT has the
                  method). None means the method saves a whole model (full fine-tuning).
    state_prefixes: module-name components that mark the method's own tensors: every parameter
                  or persistent buffer whose dotted name has a component starting with one of
                  these belongs in the adapter file (trainable or not: LoRA-FA's frozen A too).
    to_peft_config / from_peft_config: translate between the method config and PEFT's
                  adapter_config.json dictionary.
    to_peft_keys / from_peft_keys: rename state-dict keys between peftlab's module names and
                  the adapter file's names (default: PEFT's ``base_model.model.`` prefix).
    param_groups: optional ``param_groups(model, cfg, lr, weight_decay) -> list[dict]`` for
                  methods that need their own optimizer groups (LoRA+); also used when a step
                  asks for ``StepEffects.regroup``. Default: ``model.params.default_param_groups``.
    on_step:      optional ``on_step(model, cfg, step) -> StepEffects | None`` called after every
                  optimizer step (``step`` counts completed steps, from 1), while that step's
                  gradients are still in ``.grad`` (methods whose training procedure changes over
                  time: AdaLoRA's importance scores read the gradients, ReLoRA restarts, LISA
                  switches layers). It changes the model only; what the optimiser must do about it
                  it asks for in the returned ``StepEffects`` (the loop does it, train/optim.py).
                  It must bring the model to its state for ``step`` and be idempotent: on resume
                  the loop calls it once with the checkpoint's step before loading the checkpoint.
    on_train_start: optional ``on_train_start(model, cfg, total_steps) -> None`` called by the
                  training loop once, after ``apply`` and before the optimiser is built (and
                  before a resumed checkpoint is loaded): things that belong to training only,
                  not to loading a saved adapter (AdaLoRA's schedule). ``peft.init_from`` (continuing
                  from a saved adapter) is the loop's, right after this hook.
    saved_config: optional ``saved_config(cfg, model) -> cfg``: the method config a saved adapter
                  is loaded with, when saving rewrites the adapter (PiSSA/OLoRA are saved as a
                  plain LoRA of rank 2r against the untouched base, as PEFT does).
    param_extra:  optional ``param_extra(model, cfg) -> dict`` of figures ``peftlab params``
                  adds to its report and JSON.
    finalize:     optional ``finalize(model, cfg) -> None`` turning a trained model into its
                  inference form (folds P-tuning's prompt encoder / prefix tuning's MLP into the
                  tensors it produces). The loop calls it after training, before saving the
                  artifact; ``load_adapter`` calls it after ``apply`` so the expected tensors are
                  the saved (folded) ones.
    aux_loss:     optional ``aux_loss(model, cfg, batch) -> Tensor | None``: an extra term of the
                  training objective for the micro-batch just run forward, as a mean per label token
                  (MoE load balancing, AdaLoRA's orthogonality regulariser). The loop adds ``aux * label_tokens`` to the micro-batch's loss
                  sum, so gradient accumulation stays exact; eval loss never includes it.
    set_speed:    optional ``set_speed(model, fast_path, cache_weight) -> None``: the loop's speed
                  levers for the method's layers (LoRA's fused autograd function; keeping a cached
                  weight, off under FSDP where weights are gathered per step).
    init_batches: optional ``init_batches(cfg) -> int``: how many training batches a data-driven
                  initialisation reads (EVA, CorDA, LoRA-GA); 0 or None: none.
    init_from_data: optional ``init_from_data(model, cfg, batches, saved) -> None``, called by the
                  training loop once, after ``apply`` and the data are ready and before the
                  parameter report, ``on_train_start`` and the optimiser. ``batches``: the
                  ``init_batches(cfg)`` collated batches from the start of the training data's
                  seeded order (the same on every rank), or None when resuming: then ``saved`` holds
                  the checkpoint's tensors and the method rebuilds from them what its init changed
                  outside them (per-layer ranks, the base's residual), without reading data.
    float_base:   optional ``float_base(cfg) -> str | None``: the ``model.quantize`` kind the method
                  quantises the base to itself (LoftQ): the loop then loads the base in float, runs
                  ``apply`` on the float weights, and quantises the rest of the base after it.
    edits_base:   optional ``edits_base(cfg) -> bool``: True when the method changes the base
                  model's own weights (full fine-tuning, BitFit, LISA, ReLoRA's merges, Delta-LoRA,
                  PiSSA/OLoRA's residual), so switching its modules off (methods/base_only.py) does
                  not give back the model training started from; a preference objective's
                  reference then needs a frozen copy. None: the base stays as it was loaded.
    run_fields:   names of config fields the method fills in while it trains (LoRA-drop's
                  ``keep_layers``, chosen at its pruning step): every checkpoint records their values
                  and resuming sets them back on the config before ``on_step`` brings the model to the
                  checkpoint's step, so a structure chosen from data (which a checkpoint cannot
                  replay) is rebuilt as it was.
    """

    name: str
    config_cls: type
    apply: Callable[[nn.Module, Any], None]
    merge: Callable[[nn.Module], None] | None = None
    peft_type: str | None = None
    state_prefixes: tuple[str, ...] = ()
    to_peft_config: Callable[[Any, nn.Module], dict] | None = None
    from_peft_config: Callable[[dict], Any] | None = None
    to_peft_keys: Callable[[dict], dict] = add_peft_prefix
    from_peft_keys: Callable[[dict], dict] = strip_peft_prefix
    param_groups: Callable[..., list[dict]] | None = None
    on_step: Callable[..., StepEffects | None] | None = None
    on_train_start: Callable[..., None] | None = None
    saved_config: Callable[..., Any] | None = None
    param_extra: Callable[..., dict] | None = None  # extra figures for `peftlab params` (e.g. LISA)
    finalize: Callable[[nn.Module, Any], None] | None = None
    aux_loss: Callable[..., Any] | None = None
    set_speed: Callable[[nn.Module, bool, bool], None] | None = None
    edits_base: Callable[[Any], bool] | None = None
    run_fields: tuple[str, ...] = ()
    init_batches: Callable[[Any], int] | None = None
    init_from_data: Callable[..., None] | None = None
    float_base: Callable[[Any], str | None] | None = None
    aliases: tuple[str, ...] = field(default=())


_METHODS: dict[str, Method] = {}
_BY_PEFT_TYPE: dict[str, Method] = {}
_LOADED = False


def register(method: Method) -> Method:
    """Add a method; called once from the method's own module."""
    for name in (method.name, *method.aliases):
        if name in _METHODS and _METHODS[name] is not method:
            raise RuntimeError(f"method name {name!r} registered twice")
        _METHODS[name] = method
    if method.peft_type and method.peft_type not in _BY_PEFT_TYPE:
        _BY_PEFT_TYPE[method.peft_type] = method
    return method


def _load_all() -> None:
    """Import every module in peftlab.methods so each registers itself."""
    global _LOADED
    if _LOADED:
        return
    from . import methods

    for info in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"{methods.__name__}.{info.name}")
    _LOADED = True


def get(name: str) -> Method:
    _load_all()
    if name not in _METHODS:
        raise ConfigError(
            f"unknown peft.method {name!r}; available methods: {', '.join(names())}"
        )
    return _METHODS[name]


def by_peft_type(peft_type: str) -> Method:
    _load_all()
    if peft_type not in _BY_PEFT_TYPE:
        known = ", ".join(sorted(_BY_PEFT_TYPE))
        raise ConfigError(
            f"adapter has peft_type {peft_type!r}, which peftlab cannot load; known types: {known}"
        )
    return _BY_PEFT_TYPE[peft_type]


def names() -> list[str]:
    _load_all()
    return sorted({m.name for m in _METHODS.values()})
