"""The lean decoder, kept under its old name: it lives in ``peftlab.model.decode`` (training's
rollouts decode with it too, and training may not import evaluation)."""

from ..model.decode import (  # noqa: F401
    ARCHS,
    STATIC_ROPE,
    LeanWeights,
    continue_batch,
    forget,
    lean_decode,
    lean_greedy,
    lean_weights,
    left_pad,
    sample_next,
    supports,
)
