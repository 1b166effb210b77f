"""The form's data preview: ``peftlab data inspect``'s own report, as HTML.

The report is built by data/inspect.py exactly as the command builds it (no packing, so both
ways are measured), with its colours on; the colour codes become spans here: trained tokens
(green on a terminal) in ``<mark class=trained>``, prompt tokens (dim) in ``<span class=prompt>``.
"""

from __future__ import annotations

import html
import re

from ..configure import load_config
from ..data.inspect import DIM, GREEN, RESET, report
from .forms import check
from .workspace import Workspace

_CODES = re.compile("(" + "|".join(map(re.escape, (GREEN, DIM, RESET))) + ")")


def ansi_to_html(text: str) -> str:
    out, open_tag = [], None
    for part in _CODES.split(text):
        if part == GREEN:
            out.append("<mark class=trained>")
            open_tag = "</mark>"
        elif part == DIM:
            out.append("<span class=prompt>")
            open_tag = "</span>"
        elif part == RESET:
            if open_tag:
                out.append(open_tag)
            open_tag = None
        else:
            out.append(html.escape(part))
    if open_tag:
        out.append(open_tag)
    return "".join(out)


def preview(ws: Workspace, values: dict, index: int = 0) -> dict:
    """{"ok": True, "html"} with the inspect report of the form's data settings, or the form's error."""
    from ..data.dataset import build_datasets
    from ..model.load import tokenizer_for

    checked = check(ws, values)
    if not checked["ok"]:
        return checked
    if not isinstance(index, int) or index < 0:
        return {"ok": False, "field": None, "error": f"index must be a whole number >= 0, got {index!r}"}
    cfg = load_config(None, checked["overrides"])
    cfg.data.packing = False
    cfg.data.group_by_length = False
    if cfg.data.path and not cfg.data.path.startswith("/"):  # relative to the workspace, like the launched run
        cfg.data.path = str(ws.root / cfg.data.path)
    if cfg.data.eval_path and not cfg.data.eval_path.startswith("/") and "/" in cfg.data.eval_path:
        cfg.data.eval_path = str(ws.root / cfg.data.eval_path)
    tok = tokenizer_for(cfg.model)
    data = build_datasets(cfg.data, tok, cfg.train.seed)
    text = report(data, tok, cfg.train.batch_size, cfg.data.max_length, cfg.train.seed, index, color=True)
    return {"ok": True, "html": ansi_to_html(text)}
