"""peftlab params [CONFIG] [key=value ...] [--json]"""

from __future__ import annotations

import json

from ._args import add_config_arguments, config_from_args

NAME = "params"
HELP = "count trainable and total parameters for a model and method (no training)"


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--json", action="store_true", help='print {"trainable": N, "total": M}')


def run(args) -> int:
    from .. import registry
    from ..model.load import load_model
    from ..model.params import param_report

    cfg = config_from_args(args.args)
    # Shapes are all that counting needs: build config:<arch> models on the meta device.
    device = "meta" if cfg.model.name.startswith("config:") else None
    model, _ = load_model(cfg.model, seed=cfg.train.seed, with_tokenizer=False, device=device)
    method = registry.get(cfg.peft.method)
    method.apply(model, cfg.peft)
    extra = method.param_extra(model, cfg.peft) if getattr(method, "param_extra", None) else {}
    report = param_report(model, extra)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(f"model: {cfg.model.name}   method: {cfg.peft.method}")
        print(report.format())
    return 0
