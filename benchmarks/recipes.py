"""The recipe suite: which training defaults give the best model on short runs (issue 14).

Four closed tasks (one of them at two budgets) whose answers are computed (so held-out exact match
is a fair score), each with the knobs a user would pick for it and a budget between 50 and 500
optimiser steps, 3 seeds each:

    tasks       builtin:tasks (six short transformations), held-out records      50 steps
    tasks-500   the same at the long budget                                      500 steps (1.4 epochs)
    codes       builtin:codes (message -> 1 of 12 codes), held-out phrasings     5 epochs  (~110 steps)
    multicode   builtin:multicode (two codes joined by "; "), held-out phrasings 3 epochs  (~113 steps)
    zh-numbers  builtin:zh-numbers (0..999 -> Chinese numerals), held-out values 4 epochs  (200 steps)

Every task: SmolLM2-135M-Instruct, LoRA r=8, alpha=16 on all linear layers, batch 8, lr 5e-4,
float32. A *recipe* is what peftlab adds to those knobs (schedule, warm-up, clipping):

    plain        a 40-line Hugging Face PEFT loop: constant lr, no warm-up, no clipping (the reference)
    old          peftlab's defaults before this suite: cosine to 0, 3% warm-up, clip 1.0
    constant     constant lr after warm-up, clip 1.0
    wsd          warm-up, stable, then a linear decay to 0 over the last 20% (train.schedule=wsd)
    cosine-floor cosine to 10% of the lr
    default      whatever peftlab's defaults are now (no schedule key given)

Run (each training in its own subprocess, results appended to a JSONL file so a run resumes):

    python benchmarks/recipes.py --recipes plain,default --seeds 1,2,3 --out benchmarks/results/recipes.jsonl
    python benchmarks/recipes.py --table benchmarks/results/recipes.jsonl

The LoRA knobs study (KNOB_VARIANTS: one knob of the r=8/alpha=16/all-linear baseline changed at a
time, the baseline being the suite's `default` rows):

    python benchmarks/recipes.py --tasks tasks --recipes alpha32,r2,r32,qv-only,rslora,dora,loraplus \
        --seeds 1,2,3 --parallel 1 --out benchmarks/results/recipes_knobs.jsonl
    python benchmarks/recipes.py --table benchmarks/results/recipes.jsonl,benchmarks/results/recipes_knobs.jsonl

The long budget and the LoRA learning rate (the `lr*` variants, the default recipe at another lr):

    python benchmarks/recipes.py --tasks tasks-500 --recipes plain,default --out benchmarks/results/recipes_500.jsonl
    python benchmarks/recipes.py --tasks tasks --recipes lr1e-4,lr2e-4,lr1e-3 --parallel 1 \
        --out benchmarks/results/recipes_lr.jsonl

The per-method lr default (config classes' `default_lr`): "<method>@<lr>" trains that method with its
own defaults for its other keys, "<method>@default" leaves train.lr unset:

    python benchmarks/recipes.py --tasks tasks --recipes ia3@2e-4,ia3@1e-3,ia3@5e-3,full@5e-5,lora@default \
        --seeds 1 --out benchmarks/results/recipes_methods_lr.jsonl

The table gives held-out exact match per task and recipe: mean over seeds and (min-max).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT, worker_env  # noqa: E402

TASKS = {
    "tasks": {"data": ["data.path=builtin:tasks", "data.eval_split=90"], "steps": 50, "max_new_tokens": 24},
    # the same task at the suite's long budget: 500 steps of 8 are 1.4 epochs of its 2910 training records
    "tasks-500": {"data": ["data.path=builtin:tasks", "data.eval_split=90"], "steps": 500, "max_new_tokens": 24},
    "codes": {"data": ["data.path=builtin:codes", "data.eval_path=builtin:codes/heldout"], "epochs": 5,
              "max_new_tokens": 8},
    "multicode": {"data": ["data.path=builtin:multicode", "data.eval_path=builtin:multicode/heldout"], "epochs": 3,
                  "max_new_tokens": 16},
    "zh-numbers": {"data": ["data.path=builtin:zh-numbers", "data.eval_path=builtin:zh-numbers/heldout"],
                   "epochs": 4, "max_new_tokens": 24},
}
KNOBS = {"r": 8, "alpha": 16, "batch_size": 8, "lr": 5e-4}
RECIPES = {
    "plain": None,  # the plain PEFT loop below
    "old": ["train.schedule=cosine", "train.warmup=0.03", "train.max_grad_norm=1.0", "train.min_lr_ratio=0"],
    "constant": ["train.schedule=constant", "train.warmup=0.03", "train.max_grad_norm=1.0"],
    # the plain loop's knobs in peftlab's loop: what is left between it and `plain` is the LoRA
    # init and the batch order each seed draws (implementation noise, not a recipe)
    "bare": ["train.schedule=constant", "train.warmup=0", "train.max_grad_norm=0"],
    "wsd": ["train.schedule=wsd", "train.warmup=0.03", "train.max_grad_norm=1.0", "train.min_lr_ratio=0"],
    "cosine-floor": ["train.schedule=cosine", "train.warmup=0.03", "train.max_grad_norm=1.0",
                     "train.min_lr_ratio=0.1"],
    "default": [],
}
# The LoRA knobs study (issue 14 item 5): one knob of the baseline changed at a time, with peftlab's
# default recipe; the baseline itself is the `default` row (r=8, alpha=16, all linear layers).
KNOB_VARIANTS = {
    "alpha32": ["peft.alpha=32"],
    "r2": ["peft.r=2"],
    "r32": ["peft.r=32"],
    "qv-only": ["peft.targets=q_proj,v_proj"],
    "rslora": ["peft.use_rslora=true"],
    "dora": ["peft.method=dora"],
    "loraplus": ["peft.loraplus_lr_ratio=16"],
    # the LoRA learning-rate default (issue 14 item 2): the baseline's 5e-4 against lower and higher
    "lr1e-4": ["train.lr=1e-4"],
    "lr2e-4": ["train.lr=2e-4"],
    "lr1e-3": ["train.lr=1e-3"],
}
RECIPES.update(KNOB_VARIANTS)
# The per-method learning rate (issue 14 item 2): a recipe named "<method>@<lr>" trains peft.method=<method>
# with its own defaults for every other method key (LoRA keeps the suite's r=8/alpha=16/all-linear) at
# train.lr=<lr>, or with train.lr left unset for "<method>@default" (the method's own default lr).


def recipe_settings(recipe: str) -> list[str] | None:
    """The overrides a recipe adds to the task's knobs (None: the plain PEFT loop)."""
    if "@" in recipe:
        method, lr = recipe.split("@", 1)
        return [f"peft.method={method}"] + ([] if lr == "default" else [f"train.lr={lr}"])
    if recipe not in RECIPES:
        raise SystemExit(f"unknown recipe {recipe!r}: one of {', '.join(RECIPES)} or <method>@<lr|default>")
    return RECIPES[recipe]


def overrides(task: str, seed: int, recipe: str = "default") -> list[str]:
    t = TASKS[task]
    budget = [f"train.steps={t['steps']}"] if "steps" in t else [f"train.epochs={t['epochs']}"]
    method, _, lr = recipe.partition("@")
    lora_knobs = [f"peft.r={KNOBS['r']}", f"peft.alpha={KNOBS['alpha']}", "peft.targets=all-linear"]
    return ["model.name=smollm2-135m", "peft.method=lora", *(lora_knobs if not lr or method == "lora" else []),
            f"train.batch_size={KNOBS['batch_size']}", *([] if lr else [f"train.lr={KNOBS['lr']}"]),
            f"train.seed={seed}", "train.eval_every=0", "train.threads=1", "train.progress=false",
            "train.mixed_precision=no", "train.overwrite=true", *t["data"], *budget]


def plain_peft_loop(cfg, model, data) -> tuple[object, int, float]:
    """The reference: Hugging Face PEFT's LoRA, AdamW at a constant lr, no warm-up, no clipping,
    shuffled batches of the same examples peftlab trains on. Returns (merged model, steps, last loss)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.train.seed)
    peft_model = get_peft_model(model, LoraConfig(r=cfg.peft.r, lora_alpha=cfg.peft.alpha, lora_dropout=0.0,
                                                  target_modules="all-linear"))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(data.train, batch_size=cfg.train.batch_size, shuffle=True,
                                         collate_fn=data.collate,
                                         generator=torch.Generator().manual_seed(cfg.train.seed))
    steps = cfg.train.steps or int(cfg.train.epochs * len(loader))
    done, loss = 0, float("nan")
    peft_model.train()
    while done < steps:
        for batch in loader:
            out = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"])
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            done, loss = done + 1, out.loss.item()
            if done >= steps:
                break
    return peft_model.merge_and_unload(), done, loss


def worker(spec: dict) -> dict:
    """Train one (task, recipe, seed) and score the held-out split by exact match."""
    import torch

    from peftlab.configure import load_config
    from peftlab.data.dataset import build_datasets
    from peftlab.eval.generate import generate
    from peftlab.eval.metrics import exact_match
    from peftlab.model.load import load_model
    from peftlab.train.evaluate import evaluate_loss
    from peftlab.train.loop import train

    torch.set_num_threads(1)
    task, recipe, seed = spec["task"], spec["recipe"], spec["seed"]
    out_dir = Path(spec["work"]) / f"{task}-{recipe}-{seed}"
    settings = recipe_settings(recipe)
    cfg = load_config(None, overrides(task, seed, recipe) + (settings or []) + [f"train.output_dir={out_dir}"])
    model, tok = load_model(cfg.model, seed=seed)
    data = build_datasets(cfg.data, tok, seed)
    started = time.time()
    if settings is None:
        model, steps, last_loss = plain_peft_loop(cfg, model, data)
    else:
        result = train(cfg, model=model, tokenizer=tok)
        model, steps = result.model, result.steps
        last_loss = next((m["loss"] for m in reversed(result.metrics) if "loss" in m), float("nan"))
    train_s = time.time() - started
    eval_loss = evaluate_loss(model, data.eval, 16, data.collate, torch.device("cpu"), None)  # the same for both
    records = data.eval_records
    preds = generate(model, tok, data.encoder, [r.messages[:-1] for r in records],
                     max_new_tokens=TASKS[task]["max_new_tokens"], batch_size=16)
    refs = [r.messages[-1]["content"] for r in records]
    hits = [exact_match(p, r) for p, r in zip(preds, refs)]
    return {"task": task, "recipe": recipe, "seed": seed, "exact_match": sum(hits) / len(hits),
            "n_eval": len(hits), "eval_loss": round(eval_loss, 5), "steps": steps, "final_train_loss": last_loss, "train_s": round(train_s, 1),
            "lr": cfg.train.lr,
            "settings": settings, "samples": [[p, r] for p, r in list(zip(preds, refs))[:5]]}


def done_keys(path: Path) -> set:
    if not path.exists():
        return set()
    return {(r["task"], r["recipe"], r["seed"]) for r in map(json.loads, path.read_text().splitlines()) if r}


def run_all(tasks, recipes, seeds, out: Path, work: Path, parallel: int) -> None:
    todo = [(t, r, s) for s in seeds for t in tasks for r in recipes if (t, r, s) not in done_keys(out)]
    env = worker_env()
    running: list = []
    while todo or running:
        while todo and len(running) < parallel:
            t, r, s = todo.pop(0)
            spec = json.dumps({"task": t, "recipe": r, "seed": s, "work": str(work)})
            proc = subprocess.Popen([sys.executable, __file__, "--worker", spec], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            running.append(((t, r, s), proc))
        time.sleep(2)
        for item in list(running):
            key, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                print(f"FAILED {key}: {stderr[-2000:]}", file=sys.stderr, flush=True)
                continue
            row = json.loads(stdout.strip().splitlines()[-1])
            with out.open("a") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            print(f"{key}: exact match {row['exact_match']:.1%}, {row['steps']} steps, "
                  f"loss {row['final_train_loss']:.3f}, {row['train_s']:.0f} s", flush=True)


def table(paths: list[Path]) -> str:
    """Held-out exact match (%) and held-out eval loss per task and recipe: mean over seeds (min-max, n)."""
    rows = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    return "\n\n".join(_table(rows, key, scale, fmt) for key, scale, fmt in
                        (("exact_match", 100, "{:.1f}"), ("eval_loss", 1, "{:.3f}")))


def _table(rows: list[dict], key: str, scale: float, fmt: str) -> str:
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    recipes = [r for r in RECIPES if any(x["recipe"] == r for x in rows)]
    recipes += list(dict.fromkeys(x["recipe"] for x in rows if x["recipe"] not in RECIPES))  # <method>@<lr>
    lines = [f"| {key} | " + " | ".join(f"{t} ({_steps(rows, t)} steps)" for t in tasks) + " | mean |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for rec in recipes:
        cells, means = [], []
        for t in tasks:
            vals = [x[key] * scale for x in rows if x["task"] == t and x["recipe"] == rec and key in x]
            if not vals:
                cells.append("-")
                continue
            means.append(statistics.mean(vals))
            spread = f" ({fmt.format(min(vals))}-{fmt.format(max(vals))})" if len(vals) > 1 else ""
            cells.append(fmt.format(means[-1]) + spread + f", n={len(vals)}")
        overall = fmt.format(statistics.mean(means)) if len(means) == len(tasks) else "-"
        lines.append(f"| {rec} | " + " | ".join(cells) + f" | {overall} |")
    return "\n".join(lines)


def lr_table(paths: list[Path]) -> str:
    """The per-method lr study ("<method>@<lr>" rows): one line per method, one cell per lr tried:
    held-out exact match % per seed (seeds 1, 2, ...) and the mean eval loss; the method's default marked."""
    from peftlab import registry
    from peftlab.config import default_lr

    rows = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    grid: dict[str, dict[float, list[dict]]] = {}
    for r in rows:
        method, _, lr = r["recipe"].partition("@")
        if lr:
            grid.setdefault(method, {}).setdefault(float(r["lr"]), []).append(r)
    lines = ["| method | default | exact match %, seeds in order (eval loss) at each lr |", "|---|---|---|"]
    for method, by_lr in grid.items():
        own = default_lr(registry.get(method).config_cls)
        cells = []
        for lr in sorted(by_lr):
            runs = sorted(by_lr[lr], key=lambda r: r["seed"])
            ems = " / ".join(f"{100 * r['exact_match']:.1f}" for r in runs)
            loss = statistics.mean(r["eval_loss"] for r in runs)
            cell = f"{lr:g}: {ems} ({loss:.3f})"
            cells.append(f"**{cell}**" if lr == own else cell)
        lines.append(f"| `{method}` | {own:g} | " + "; ".join(cells) + " |")
    return "\n".join(lines)


def _steps(rows, task) -> str:
    steps = sorted({x["steps"] for x in rows if x["task"] == task})
    return "/".join(map(str, steps))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--recipes", default="plain,old,default")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/recipes.jsonl"))
    p.add_argument("--work", default="/tmp/peftlab-recipes")
    p.add_argument("--parallel", type=int, default=2, help="trainings at once (one thread each)")
    p.add_argument("--table", help="print the table of results files (comma-separated) and exit")
    p.add_argument("--lr-table", help="print the per-method lr table of results files (comma-separated) and exit")
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker)), ensure_ascii=False))
        return
    if a.lr_table:
        print(lr_table([Path(x) for x in a.lr_table.split(",")]))
        return
    if a.table:
        print(table([Path(x) for x in a.table.split(",")]))
        return
    for recipe in a.recipes.split(","):
        recipe_settings(recipe)  # an unknown name fails before any training
    run_all(a.tasks.split(","), a.recipes.split(","), [int(s) for s in a.seeds.split(",")], Path(a.out),
            Path(a.work), a.parallel)
    print(table([Path(a.out)]))


if __name__ == "__main__":
    main()
