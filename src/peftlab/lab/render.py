"""The report's pages: what it says (``content``, worked out once) and its two writers.

``content(runs, sweeps, groups, title)`` gathers every section from the runs (``report.RunView``),
the sweeps and the seed groups (``seeds.group_by_seed``): the setup lines, the trainable-parameter,
"Across seeds", quality and cost tables (``tables``), the side-by-side generations and the runs
that did not finish. ``markdown`` and ``html`` write the same ``Content``, so the two files cannot
disagree; the Markdown links the curve PNGs beside it, the HTML page embeds them (base64).
"""

from __future__ import annotations

import base64
import html as _html
import re
import time
from dataclasses import dataclass

from .seeds import NOTE as SEEDS_NOTE
from .tables import COST, QUALITY, QUALITY_NOTE, cells, param_rows, seed_table

PARAM_HEADERS = ["run", "method", "rank", "trainable", "total", "% trainable"]
MEMORY_NOTE = ("Peak memory is the peak resident set size of the training process (CPU) or peak CUDA allocation; "
               "'whole run' includes loading and the evaluation afterwards.")
CURVES_ALT = "train and eval loss vs step"
SEEDS_ALT = "mean train and eval loss over the seeds vs step, min-max shaded"

Table = tuple[list[str], list[list]]  # headers, rows; a cell is text or (text, is_best)


@dataclass
class Content:
    """Everything a report page shows, in order."""

    title: str
    generated: str
    setup: list[str]
    params: Table
    seeds: Table | None
    quality: Table
    cost: Table
    generations: list[tuple[str, list[tuple[str, str]]]]  # (prompt, [(run, answer)])
    failed: list[tuple[str, str, str]]  # (run, status, error)


def content(runs: list, sweeps: list[dict], groups: list, title: str) -> Content:
    done = [r for r in runs if r.status == "success" or r.metrics]

    def table(columns) -> Table:
        headers, rows = cells(done, columns)
        return ["run", *headers], [[r.name, *row] for r, row in zip(done, rows)]

    generations = [(p, [(r.name, r.answer(p)) for r in runs if r.answer(p) is not None]) for p in sample_prompts(runs)]
    return Content(title, time.strftime("%Y-%m-%d %H:%M"), setup_lines(runs, sweeps), (PARAM_HEADERS, param_rows(runs)),
                   seed_table(groups), table(QUALITY), table(COST), generations,
                   [(r.name, r.status, r.error.strip()) for r in runs if r.status != "success"])


def setup_lines(runs: list, sweeps: list[dict]) -> list[str]:
    """The sweeps, then the first configured run's model, data and loop, the seeds and the learning rates."""
    lines = [f"sweep `{s.get('name')}` ({s.get('dir')}), {len(s.get('runs', []))} runs" for s in sweeps]
    ok = [r for r in runs if r.config]
    if not ok:
        return lines
    c = ok[0].config
    m, d, t = c.get("model", {}), c.get("data", {}), c.get("train", {})
    budget = f"{t['steps']} steps" if t.get("steps") else f"{t.get('epochs')} epochs"
    seeds = list(dict.fromkeys(str((r.config.get("train") or {}).get("seed")) for r in ok))
    lines.append(f"model `{m.get('name')}`; data `{d.get('path')}` (max_length {d.get('max_length')}, "
                 f"eval_split {d.get('eval_split')}); {budget} of batch {t.get('batch_size')} x accum "
                 f"{t.get('grad_accum')}; schedule {t.get('schedule')}, warmup {t.get('warmup')}; precision "
                 f"{t.get('mixed_precision')}; {'seed' if len(seeds) == 1 else 'seeds'} {', '.join(seeds)}")
    lrs = {r.name: (r.config.get("train") or {}).get("lr") for r in ok}
    if len(set(map(str, lrs.values()))) > 1:
        lines.append("learning rates: " + ", ".join(f"{n} {v}" for n, v in lrs.items()))
    else:
        lines.append(f"learning rate {next(iter(lrs.values()))} for every run")
    return lines


def sample_prompts(runs: list) -> list[str]:
    """Every prompt any run has a stored answer for, in first-seen order."""
    seen: list[str] = []
    for r in runs:
        for s in r.samples:
            if s.get("prompt") not in seen:
                seen.append(s.get("prompt"))
    return seen


# ---------------------------------------------------------------------------- Markdown


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def _md_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        texts = []
        for c in row:
            text, best = c if isinstance(c, tuple) else (c, False)
            texts.append(f"**{text}**" if best else str(text))
        out.append("| " + " | ".join(_md_escape(x) for x in texts) + " |")
    return "\n".join(out)


def markdown(c: Content, png_name: str, seeds_png_name: str | None = None) -> str:
    parts = [f"# {c.title}", "", f"Generated {c.generated} by `peftlab report`.", ""]
    parts += [f"- {line}" for line in c.setup] + [""]
    parts += ["## Trainable parameters", "", _md_table(*c.params), ""]
    parts += ["## Learning curves", "", f"![{CURVES_ALT}]({png_name})", ""]
    if c.seeds:
        parts += ["## Across seeds (best mean per column in bold)", "", SEEDS_NOTE, "", _md_table(*c.seeds), ""]
        parts += [f"![{SEEDS_ALT}]({seeds_png_name})", ""] if seeds_png_name else []
    parts += ["## Quality (best per column in bold)", "", QUALITY_NOTE, "", _md_table(*c.quality), ""]
    parts += ["## Time and memory (best per column in bold)", "", MEMORY_NOTE, "", _md_table(*c.cost), ""]
    if c.generations:
        parts += ["## Side-by-side generations", ""]
        for prompt, answers in c.generations:
            parts += [f"### {prompt}", "", _md_table(["run", "answer"], [[n, a or "–"] for n, a in answers]), ""]
    if c.failed:
        parts += ["## Runs that did not finish", ""]
        parts += [f"- **{name}**: {status}" + (f" — `{error.splitlines()[0]}`" if error else "")
                  for name, status, error in c.failed] + [""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------- HTML

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left;font-weight:600}
td.best{font-weight:700;background:#e5f5e0}.note{color:#666;font-size:12.5px}
img{max-width:100%;border:1px solid #eee}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:10px;margin-bottom:1.2em}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;background:#fafafa}
.card h4{margin:0 0 4px;font-size:13px}.card pre{white-space:pre-wrap;margin:0;font:12.5px/1.4 ui-monospace,monospace}
.fail{color:#b00}
"""


def _html_table(headers: list[str], rows: list[list]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_html.escape(h)}</th>" for h in headers) + "</tr>"]
    for row in rows:
        tds = []
        for c in row:
            text, best = c if isinstance(c, tuple) else (c, False)
            tds.append(f"<td{' class=best' if best else ''}>{_html.escape(str(text))}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    return "\n".join(out) + "</table>"


def _code(escaped: str) -> str:
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", escaped)


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{alt}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def html(c: Content, png: bytes | None, seeds_png: bytes | None = None) -> str:
    e = _html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(c.title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{e(c.title)}</h1>", f"<p class=note>Generated {c.generated} by peftlab report.</p>",
             "<ul>" + "".join(f"<li>{_code(e(line))}</li>" for line in c.setup) + "</ul>",
             "<h2>Trainable parameters</h2>", _html_table(*c.params), "<h2>Learning curves</h2>"]
    parts += [_img(png, CURVES_ALT)] if png else []
    if c.seeds:
        parts += [f"<h2>Across seeds</h2><p class=note>Best mean per column highlighted. {e(SEEDS_NOTE)}</p>",
                  _html_table(*c.seeds)] + ([_img(seeds_png, SEEDS_ALT)] if seeds_png else [])
    parts += [f"<h2>Quality</h2><p class=note>Best per column highlighted. {e(QUALITY_NOTE)}</p>",
              _html_table(*c.quality),
              f"<h2>Time and memory</h2><p class=note>{e(MEMORY_NOTE)}</p>", _html_table(*c.cost)]
    if c.generations:
        parts.append("<h2>Side-by-side generations</h2>")
        for prompt, answers in c.generations:
            cards = "".join(f"<div class=card><h4>{e(n)}</h4><pre>{e(a or '')}</pre></div>" for n, a in answers)
            parts.append(f"<h3>{e(prompt)}</h3><div class=grid>{cards}</div>")
    if c.failed:
        parts.append("<h2>Runs that did not finish</h2><ul>")
        parts += [f"<li><b>{e(name)}</b>: <span class=fail>{e(status)}</span>" + (f"<pre>{e(error)}</pre>" if error else "")
                  + "</li>" for name, status, error in c.failed]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
