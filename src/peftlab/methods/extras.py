"""TEMPORARY (helper B, issue 13): the old names of methods/extras.py, until relora.py and
delta_lora.py import from their new homes (methods.merging, methods.lowrank). Removed at the end."""

from .merging import shared_weight_ids, untie_base  # noqa: F401
