"""Sweeps: a base config times a grid of overrides, one run directory per point, resumable.

A sweep file (YAML)::

    name: full-vs-lora                 # default: the file's stem
    output_dir: runs/sweeps/full-vs-lora   # default: runs/sweeps/<name> (relative to the cwd)
    base: ../smollm2-alpaca.yaml       # optional run config to start from (relative to this file)
    config:                            # optional sections merged over ``base`` (a run config's keys)
      data: {max_length: 256}
      train: {steps: 50}
    variants:                          # optional: explicit points, each a mapping of dotted keys
      - {name: full, peft.method: full, train.lr: 5e-5}
      - {peft.method: lora, train.lr: 5e-4}
    grid:                              # dotted key -> list of values, crossed with every variant
      peft.r: [1, 2, 4, 8, 16, 32]
    parallel: 1                        # runs at a time
    eval: {limit: 32, max_new_tokens: 64}   # eval.harness.EvalConfig: held-out scoring + samples

Points are ``variants x grid`` (the grid alone when there are no variants). **Method-specific
keys:** a ``peft.*`` key that the point's method does not have (``peft.r`` for ``full``) is
dropped for that point, and points that become identical are run once; so
``peft.method: [full, lora]`` x ``peft.r: [1, 2]`` is three runs: full, lora-r1, lora-r2. A
``peft.*`` key that no method of the sweep has is an error (a typo), as is a key given both in a
variant and in the grid. Keys under model/data/train are checked like any run config.

Each point runs in its own process (``python -m peftlab.lab.worker RUN_DIR``) in
``OUTPUT/runs/<name>/``: it trains, scores the held-out split (``eval``), generates the side-by-
side samples and writes ``result.json`` last. A point whose ``result.json`` says ``success`` for the
same resolved config is skipped, so re-running an interrupted sweep does only what is missing
(a run killed half-way restarts from its newest checkpoint when ``train.save_every`` is set,
else from scratch). A failed point is recorded (status, exit code, the log's last lines) and
the sweep goes on; it is tried again on the next invocation. Peak memory: the child's peak
resident set size from ``wait4`` (the whole process: load, train, eval), and the training loop's
own peak in ``summary.json``.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .. import registry
from ..config import DEFAULT_METHOD, apply_overrides, build_dataclass, read_yaml
from ..configure import config_from_dict
from ..errors import ConfigError
from ..eval.harness import EvalConfig
from ..io import atomic_write_text
from ..rundir import read_json

SWEEP_KEYS = ("name", "output_dir", "base", "config", "variants", "grid", "parallel", "eval")
RUN_SPEC = "run.json"
RESULT = "result.json"
LOG = "log.txt"
PLAN = "sweep.json"


@dataclass
class Point:
    name: str
    overrides: dict  # dotted key -> value, as applied (after dropping)
    dropped: list[str]  # dotted keys this point's method does not have
    config: dict  # the resolved raw config (sections -> dicts), validated


@dataclass
class Sweep:
    name: str
    output_dir: Path
    points: list[Point]
    parallel: int = 1
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: str | None = None

    def run_dir(self, p: Point) -> Path:
        return self.output_dir / "runs" / p.name


# ---------------------------------------------------------------------------- planning


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _fmt(value) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(_fmt(v) for v in value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


_SHORT = {"use_rslora": "rslora", "targets": "t", "alpha": "a", "dropout": "drop", "max_length": "len"}


def _label(key: str, value) -> str:
    leaf = key.split(".")[-1]
    short = _SHORT.get(leaf, leaf)
    if isinstance(value, bool):
        return short if value else f"no{short}"
    return f"{short}{_fmt(value)}"


def _safe(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._+=-]+", "_", name).strip("._")
    return name[:100] or "run"


def _method_fields(method: str) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(registry.get(method).config_cls)}


def _method_of(raw: dict) -> str:
    return registry.get(str((raw.get("peft") or {}).get("method", DEFAULT_METHOD))).name


def _check_list(where: str, value) -> list:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of values, got {value!r}")
    return value


def plan(path: str | Path, output_dir: str | Path | None = None, overrides: list[str] | None = None) -> Sweep:
    """Read a sweep file and expand it into validated points (nothing is run).

    ``overrides`` (``key=value``) apply to the base config before the grid, e.g. a different
    ``data.path`` or fewer ``train.steps`` for a smoke test.
    """
    path = Path(path)
    spec = read_yaml(path)
    where = str(path)
    unknown = [k for k in spec if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown sweep key {unknown[0]!r}; valid keys: {', '.join(SWEEP_KEYS)}")
    name = _safe(str(spec.get("name") or path.stem))
    base: dict = {}
    if spec.get("base"):
        base_path = (path.parent / str(spec["base"])).resolve()
        base = read_yaml(base_path)
    config = spec.get("config") or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: 'config' must be a mapping of sections (model, peft, data, train)")
    base = apply_overrides(_merge(base, config), list(overrides or []))

    grid = spec.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: 'grid' must map dotted keys to lists, e.g. peft.r: [4, 8]")
    grid = {str(k): _check_list(f"{where}: grid.{k}", v) for k, v in grid.items()}
    variants = spec.get("variants") or [{}]
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise ConfigError(f"{where}: 'variants' must be a list of mappings, e.g. - {{peft.method: full}}")
    for i, v in enumerate(variants):
        both = [k for k in v if k in grid]
        if both:
            raise ConfigError(f"{where}: key {both[0]!r} is set in variants[{i}] and in grid; keep it in one place")
        for k in v:
            if k != "name" and "." not in str(k):
                raise ConfigError(f"{where}: variants[{i}] key {k!r} is not a dotted key such as train.lr")
    for k in grid:
        if "." not in k:
            raise ConfigError(f"{where}: grid key {k!r} is not a dotted key such as peft.r")

    eval_raw = spec.get("eval") or {}
    ecfg = build_dataclass(EvalConfig, eval_raw, "eval")
    parallel = spec.get("parallel", 1)
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise ConfigError(f"{where}: 'parallel' must be an integer >= 1, got {parallel!r}")

    varying = [k for k, vs in grid.items() if len(vs) > 1]
    points: list[Point] = []
    seen: dict[str, str] = {}
    used_peft_keys: dict[str, bool] = {}  # dotted peft key -> valid for some point's method
    shared_method: dict[str, int] = {}
    for variant in variants:
        if not variant.get("name"):
            m = _method_of(_merge(base, {"peft": {"method": variant["peft.method"]}}) if "peft.method" in variant
                           else base)
            shared_method[m] = shared_method.get(m, 0) + 1
    for variant in variants:
        vname = variant.get("name")
        vkeys = {k: v for k, v in variant.items() if k != "name"}
        for combo in itertools.product(*grid.values()) if grid else [()]:
            wanted = {**vkeys, **dict(zip(grid, combo))}
            probe = copy.deepcopy(base)
            if "peft.method" in wanted:
                _set(probe, "peft.method", wanted["peft.method"])
            method = _method_of(probe)
            fields = _method_fields(method)
            applied, dropped = {}, []
            for k, v in wanted.items():
                parts = k.split(".")
                if parts[0] == "peft" and len(parts) == 2 and parts[1] not in fields:
                    dropped.append(k)
                    used_peft_keys.setdefault(k, False)
                    continue
                if parts[0] == "peft":
                    used_peft_keys[k] = True
                applied[k] = v
            raw = copy.deepcopy(base)
            for k, v in applied.items():
                _set(raw, k, v)
            # base peft keys that this method lacks (a lora base with a full variant) go too
            peft_raw = raw.get("peft") or {}
            for k in [k for k in peft_raw if k not in fields]:
                del peft_raw[k]
                dropped.append(f"peft.{k}")
            try:
                config_from_dict(copy.deepcopy(raw))
            except ConfigError as e:
                raise ConfigError(f"{where}: point {_describe(vname, applied)}: {e}") from None
            key = json.dumps(raw, sort_keys=True, default=str)
            if key in seen:
                continue  # identical after dropping method-specific keys
            # an unnamed variant is called by its method, plus its keys when another variant shares the method
            label = vname or "-".join([method] + ([_label(k, v) for k, v in vkeys.items() if k != "peft.method"]
                                                  if shared_method.get(method, 0) > 1 else []))
            parts = [label] + [_label(k, applied[k]) for k in varying if k in applied and k != "peft.method"]
            rname = _safe("-".join(str(p) for p in parts))
            if rname in seen.values():
                rname = _safe(f"{rname}-{len(points) + 1}")
            seen[key] = rname
            points.append(Point(rname, applied, sorted(set(dropped)), raw))
    typos = [k for k, ok in used_peft_keys.items() if not ok]
    if typos:
        methods = sorted({_method_of(p.config) for p in points})
        raise ConfigError(f"{where}: {typos[0]} is not an option of any method in this sweep "
                          f"({', '.join(methods)}); see `peftlab params --help` and the method docs")
    out = Path(output_dir) if output_dir else Path(str(spec.get("output_dir") or Path("runs/sweeps") / name))
    return Sweep(name, out, points, parallel, ecfg, str(path))


def _describe(vname, applied: dict) -> str:
    return (f"{vname!r} " if vname else "") + "{" + ", ".join(f"{k}={v!r}" for k, v in applied.items()) + "}"


def _set(raw: dict, dotted: str, value) -> None:
    node = raw
    parts = dotted.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = copy.deepcopy(value)


# ---------------------------------------------------------------------------- state of a run


def read_result(run_dir: Path) -> dict | None:
    return read_json(run_dir / RESULT)


def run_spec(sweep: Sweep, p: Point) -> dict:
    return {"name": p.name, "sweep": sweep.name, "overrides": p.overrides, "dropped": p.dropped,
            "config": p.config, "eval": asdict(sweep.eval)}


def is_done(run_dir: Path, spec: dict) -> bool:
    """Finished with success, for exactly this spec (config and eval settings)."""
    res = read_result(run_dir)
    if not res or res.get("train_info", {}).get("status") != "success":
        return False
    old = read_json(run_dir / RUN_SPEC)
    if old is None:
        return False
    return old.get("config") == spec["config"] and old.get("eval") == spec["eval"]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])


def _pkg_root() -> str:
    import peftlab

    return str(Path(peftlab.__file__).resolve().parents[1])


# ---------------------------------------------------------------------------- running


@dataclass
class _Running:
    point: Point
    proc: subprocess.Popen
    started: float
    log: object


def _start(sweep: Sweep, p: Point, threads: int | None) -> _Running:
    run_dir = sweep.run_dir(p)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = run_spec(sweep, p)
    old = read_json(run_dir / RUN_SPEC)
    # a run killed half-way continues from its newest checkpoint, if it has one for this config
    spec["resume"] = old is not None and old.get("config") == spec["config"] and (run_dir / "checkpoints").is_dir()
    spec["threads"] = threads  # with N runs at a time each gets cores // N (unless train.threads is set)
    atomic_write_text(run_dir / RUN_SPEC, json.dumps(spec, indent=2, default=str))
    (run_dir / RESULT).unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_pkg_root(), *filter(None, [env.get("PYTHONPATH")])])
    env["PEFTLAB_SWEEP_PARENT"] = str(os.getpid())
    env.setdefault("HF_HUB_OFFLINE", "1")
    log = (run_dir / LOG).open("a")
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start{' (resume)' if spec['resume'] else ''}\n")
    log.flush()
    proc = subprocess.Popen([sys.executable, "-m", "peftlab.lab.worker", str(run_dir)], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return _Running(p, proc, time.time(), log)


def _reap(r: _Running, block: bool) -> tuple[int, int, float] | None:
    """(exit code, peak RSS bytes, CPU seconds) once the child has ended, else None."""
    pid, status, usage = os.wait4(r.proc.pid, 0 if block else os.WNOHANG)
    if pid == 0:
        return None
    code = os.waitstatus_to_exitcode(status)
    r.proc.returncode = code  # we reaped it: tell Popen, so it does not wait again
    return code, int(usage.ru_maxrss) * (1 if sys.platform == "darwin" else 1024), usage.ru_utime + usage.ru_stime


def _finish(sweep: Sweep, r: _Running, code: int, peak: int, cpu: float) -> dict:
    r.log.close()
    run_dir = sweep.run_dir(r.point)
    res = read_result(run_dir)
    elapsed = time.time() - r.started
    if res is None:  # the worker died before it could say anything (killed, out of memory, ...)
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        res = {"run_info": {"experiment_name": r.point.name, "sweep": sweep.name, "overrides": r.point.overrides,
                            "error_msg": f"worker {why}; last lines of {run_dir / LOG}:\n{_tail(run_dir / LOG)}"},
               "train_info": {"status": "failed"}}
    res.setdefault("run_info", {})["total_time"] = round(elapsed, 2)
    res["run_info"]["exit_code"] = code
    res.setdefault("train_info", {})["process_peak_rss_bytes"] = peak
    res["run_info"]["process_cpu_s"] = round(cpu, 2)  # user + system, the whole worker
    atomic_write_text(run_dir / RESULT, json.dumps(res, indent=2, ensure_ascii=False, default=str))
    return res


def _fmt_time(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.1f}s"


def _headline(res: dict) -> str:
    ti = res.get("train_info", {})
    ev = ti.get("eval") or {}
    parts = []
    if ev.get("eval_loss") is not None:
        parts.append(f"eval loss {ev['eval_loss']:.4f}")
    if ev.get("exact_match") is not None:
        parts.append(f"exact match {100 * ev['exact_match']:.1f}%")
    if ev.get("rouge1") is not None:
        parts.append(f"ROUGE-1 {100 * ev['rouge1']:.1f}")
    if ti.get("peak_memory_bytes"):
        parts.append(f"peak RSS {ti['peak_memory_bytes'] / 2**30:.2f} GiB")
    return ", ".join(parts)


def run_sweep(sweep: Sweep, parallel: int | None = None, retry_failed: bool = True, say=print) -> dict:
    """Run every point not yet done; returns {"ok": [...], "failed": [...], "skipped": [...]}."""
    n_par = parallel or sweep.parallel
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    plan_doc = {"name": sweep.name, "source": sweep.source, "parallel": n_par, "eval": asdict(sweep.eval),
                "runs": [{"name": p.name, "overrides": p.overrides, "dropped": p.dropped} for p in sweep.points]}
    atomic_write_text(sweep.output_dir / PLAN, json.dumps(plan_doc, indent=2, default=str))
    outcome: dict[str, list[str]] = {"ok": [], "failed": [], "skipped": []}
    todo: list[tuple[int, Point]] = []
    total = len(sweep.points)
    for i, p in enumerate(sweep.points, 1):
        run_dir = sweep.run_dir(p)
        if is_done(run_dir, run_spec(sweep, p)):
            outcome["skipped"].append(p.name)
            say(f"[{i}/{total}] {p.name}: done already, skipped ({_headline(read_result(run_dir) or {})})")
        elif not retry_failed and (read_result(run_dir) or {}).get("train_info", {}).get("status") == "failed":
            outcome["failed"].append(p.name)
            say(f"[{i}/{total}] {p.name}: failed before, not retried (--no-retry-failed)")
        else:
            todo.append((i, p))
    say(f"sweep {sweep.name}: {total} runs, {len(outcome['skipped'])} done, {len(todo)} to run "
        f"({n_par} at a time) -> {sweep.output_dir}")
    threads = max(1, (os.cpu_count() or 1) // n_par) if n_par > 1 else None
    running: list[tuple[int, _Running]] = []
    queue = list(todo)

    def stop(*_):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, stop)
    try:
        while queue or running:
            while queue and len(running) < n_par:
                i, p = queue.pop(0)
                say(f"[{i}/{total}] {p.name}: running ({', '.join(f'{k}={_fmt(v)}' for k, v in p.overrides.items()) or 'the base config'}"
                    f"{'; dropped ' + ', '.join(p.dropped) if p.dropped else ''}); log: {sweep.run_dir(p) / LOG}")
                running.append((i, _start(sweep, p, threads)))
            time.sleep(0.2)
            for i, r in list(running):
                got = _reap(r, block=False)
                if got is None:
                    continue
                running.remove((i, r))
                res = _finish(sweep, r, *got)
                took = _fmt_time(time.time() - r.started)
                if res.get("train_info", {}).get("status") == "success":
                    outcome["ok"].append(r.point.name)
                    say(f"[{i}/{total}] {r.point.name}: ok in {took}; {_headline(res)}")
                else:
                    outcome["failed"].append(r.point.name)
                    first = (res.get("run_info", {}).get("error_msg") or "").strip().splitlines()
                    say(f"[{i}/{total}] {r.point.name}: FAILED after {took}: {first[0] if first else '?'} "
                        f"(log: {sweep.run_dir(r.point) / LOG})")
    except KeyboardInterrupt:
        for _, r in running:
            r.proc.terminate()
        for _, r in running:
            try:
                _reap(r, block=True)
            except ChildProcessError:
                pass
            r.log.close()
        say(f"sweep {sweep.name}: interrupted; run the same command again to continue")
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
    say(f"sweep {sweep.name}: {len(outcome['ok'])} ran ok, {len(outcome['skipped'])} skipped, "
        f"{len(outcome['failed'])} failed")
    return outcome


def dump_plan(sweep: Sweep) -> str:
    """The expanded points as YAML (``peftlab sweep --dry-run``)."""
    return yaml.safe_dump({"name": sweep.name, "output_dir": str(sweep.output_dir),
                           "runs": [{"name": p.name, "overrides": p.overrides, "dropped": p.dropped}
                                    for p in sweep.points]}, sort_keys=False)
