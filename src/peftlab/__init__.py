"""peftlab: fine-tune causal LMs with a small fraction of their parameters, compare, ship.

Python API at a glance::

    import peftlab
    cfg = peftlab.load_config("configs/lora.yaml", ["peft.r=16"])   # or load_config(None, [...])
    result = peftlab.train(cfg)                                     # run dir, metrics, adapter
    model, tok = peftlab.load_model(cfg.model)
    peftlab.apply_method(model, cfg.peft)                           # wrap + freeze in place
    peftlab.load_adapter(model, "runs/latest/adapter")              # or load a saved adapter
    peftlab.merge(model, cfg.peft)                                  # fold into plain layers

The API (``peftlab.api``) loads on first use of one of its names, so that ``import peftlab.serve...``
or any other light module does not pull in the training loop through this file.
"""

from __future__ import annotations

import importlib
import sys
import types

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


def __getattr__(name: str):
    if name == "__version__":
        module = importlib.import_module(f"{__name__}.version")
    elif name in __all__:
        module = importlib.import_module(f"{__name__}.api")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value  # later lookups find it directly
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """``peftlab.train`` is the API's function, though ``peftlab/train/`` is also a subpackage: the
    import system's record of the subpackage as an attribute here is dropped (``sys.modules`` keeps
    it), whatever was imported first."""

    train = property(lambda self: __getattr__("train"), lambda self, value: None)


sys.modules[__name__].__class__ = _Package
