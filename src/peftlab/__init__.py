"""peftlab: fine-tune causal LMs with a small fraction of their parameters, compare, ship.

Python API at a glance::

    import peftlab
    cfg = peftlab.load_config("configs/lora.yaml", ["peft.r=16"])   # or load_config(None, [...])
    result = peftlab.train(cfg)                                     # run dir, metrics, adapter
    model, tok = peftlab.load_model(cfg.model)
    peftlab.apply_method(model, cfg.peft)                           # wrap + freeze in place
    peftlab.load_adapter(model, "runs/latest/adapter")              # or load a saved adapter
    peftlab.merge(model, cfg.peft)                                  # fold into plain layers
"""

__version__ = "0.1.0"

from .api import (
    apply_method,
    generate,
    load_adapter,
    load_config,
    load_model,
    merge,
    param_report,
    save_adapter,
    train,
)

__all__ = [
    "__version__",
    "apply_method",
    "generate",
    "load_adapter",
    "load_config",
    "load_model",
    "merge",
    "param_report",
    "save_adapter",
    "train",
]
