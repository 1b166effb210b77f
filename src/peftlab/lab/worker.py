"""One sweep point in its own process: ``python -m peftlab.lab.worker RUN_DIR``.

Reads ``RUN_DIR/run.json`` (written by the sweep), trains into RUN_DIR, scores the held-out
split, generates the side-by-side samples, and writes ``RUN_DIR/result.json`` last (its
presence with ``status: success`` is what marks the point done). The layout follows Hugging
Face PEFT's method-comparison results: ``run_info`` (what ran), ``train_info`` (status, time,
memory, file size, parameter counts, the metric log and the final scores), ``meta_info``
(versions and machine). Any error is written to ``result.json`` as ``status: failed`` with its
message, and the exit code is 1.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

from ..io import atomic_write_text
from ..rundir import artifact_size, peak_memory_bytes, read_metrics, read_summary


def _die_with_parent() -> None:
    """Exit when the sweep that started us exits (Linux), so a killed sweep leaves no orphans."""
    parent = os.environ.get("PEFTLAB_SWEEP_PARENT")
    if not parent:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        sys.exit(143)


def _cpu_seconds() -> float | None:
    try:
        import resource

        u = resource.getrusage(resource.RUSAGE_SELF)
        return round(u.ru_utime + u.ru_stime, 2)
    except (ImportError, OSError):
        return None


def _meta(device, amp, threads: int) -> dict:
    import torch
    import transformers

    from ..version import __version__

    return {"peftlab_version": __version__, "torch_version": torch.__version__,
            "transformers_version": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "device": str(device), "precision": str(amp or "float32").replace("torch.", ""), "threads": threads}


def _config(spec: dict, run_dir: Path):
    """(Config, resume) of the sweep point: its config, trained into RUN_DIR."""
    from ..configure import config_from_dict

    raw = json.loads(json.dumps(spec["config"]))
    train_raw = raw.setdefault("train", {})
    train_raw["output_dir"] = str(run_dir)
    train_raw.setdefault("progress", False)  # a log file, not a terminal
    if spec.get("threads") and not train_raw.get("threads"):
        train_raw["threads"] = spec["threads"]
    resume = bool(spec.get("resume"))
    if not resume:
        train_raw["overwrite"] = True
    return config_from_dict(raw), resume


def _step_logger(steps_total: int | None, say):
    def log_step(rec: dict) -> None:
        if rec["step"] % 10 == 0 or "eval_loss" in rec or rec["step"] == steps_total:
            say(f"step {rec['step']}" + (f"/{steps_total}" if steps_total else "")
                + f" loss {rec['loss']:.4f}" + (f" eval_loss {rec['eval_loss']:.4f}" if "eval_loss" in rec else "")
                + f" lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s")

    return log_step


def _score(res, cfg, ecfg, amp, run_dir: Path, spec: dict, say) -> tuple[dict, list[dict]]:
    """(held-out scores, side-by-side samples) of the trained model."""
    from ..eval.harness import evaluate, generate_answers, write_eval

    # the loop's last eval loss is the same number when it covered the same batches: reuse it
    # (for preference runs only DPO's: the harness scores every objective as DPO against the base)
    same_loss = (ecfg.loss and res.eval_loss is not None and ecfg.batch_size == cfg.train.batch_size
                 and ecfg.loss_batches == cfg.train.eval_batches and cfg.train.objective in ("lm", "dpo"))
    if same_loss:
        ecfg.loss = False
    ev = evaluate(res.model, res.tokenizer, res.encoder, res.data.eval_records, res.data.eval,
                  res.data.collate, ecfg, amp, log=say, pref=cfg.pref)
    if same_loss:
        last = res.metrics[-1] if res.metrics else {}
        if "eval_accuracy" in last:  # a DPO run: the loop's last evaluation scored the same pairs
            ev.metrics.update({f"pref_{k[5:]}": v for k, v in last.items() if k.startswith("eval_") and k != "eval_loss"})
            ev.metrics.update(eval_loss=res.eval_loss)
        else:
            ev.metrics.update(eval_loss=res.eval_loss, perplexity=math.exp(min(res.eval_loss, 700.0)))
    if ev.predictions:
        write_eval(run_dir / "eval", ev, {"eval": spec["eval"]})
    samples = []
    if ecfg.prompts:
        t0 = time.perf_counter()
        answers = generate_answers(res.model, res.tokenizer, res.encoder, list(ecfg.prompts), ecfg, amp,
                                   max_new_tokens=ecfg.sample_max_new_tokens)
        samples = [{"prompt": p, "answer": a} for p, a in zip(ecfg.prompts, answers)]
        say(f"samples: {len(samples)} prompts in {time.perf_counter() - t0:.1f}s")
    return ev.metrics, samples


def run(run_dir: Path) -> int:
    import torch

    from ..errors import PeftlabError
    from ..eval.harness import EvalConfig
    from ..train.loop import train
    from ..train.runtime import resolve_precision

    spec = json.loads((run_dir / "run.json").read_text())
    started = time.time()
    result = {"run_info": {"experiment_name": spec["name"], "sweep": spec["sweep"],
                           "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "overrides": spec["overrides"],
                           "dropped": spec["dropped"], "train_config": spec["config"], "peft_config": None,
                           "eval_config": spec["eval"], "error_msg": ""},
              "train_info": {"status": "failed"}}
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    try:
        cfg, resume = _config(spec, run_dir)
        ecfg = EvalConfig(**spec["eval"])
        result["run_info"]["train_config"] = cfg.to_dict()  # resolved: every default filled in
        result["run_info"]["peft_config"] = None if cfg.peft.method == "full" else cfg.to_dict()["peft"]
        res = train(cfg, resume=resume, callbacks=[_step_logger(cfg.train.steps, say)])
        train_cpu = _cpu_seconds()
        summary = read_summary(run_dir)
        if summary is None:
            raise RuntimeError(f"training finished but {run_dir / 'summary.json'} is missing or damaged")
        device = next(res.model.parameters()).device
        amp = resolve_precision(cfg.train.mixed_precision, device)
        say(f"trained {res.steps} steps in {summary['wall_time_s']:.1f}s; scoring the held-out split")
        scores, samples = _score(res, cfg, ecfg, amp, run_dir, spec, say)
        result["train_info"] = {
            "status": "success",
            "train_time": summary["wall_time_s"],
            "train_cpu_s": train_cpu,  # CPU seconds of this process up to the end of training
            "steps": res.steps,
            "peak_memory_bytes": peak_memory_bytes(summary),
            "memory_kind": "cuda_allocated" if summary.get("peak_cuda_mb") else "cpu_peak_rss",
            "file_size": artifact_size(run_dir) or 0,
            "num_trainable_params": summary["trainable"],
            "num_total_params": summary["total"],
            "data": summary.get("data"),
            "metrics": read_metrics(run_dir),
            "eval": scores,
        }
        result["samples"] = samples
        result["meta_info"] = _meta(device, amp, torch.get_num_threads())
        code = 0
    except PeftlabError as e:
        result["run_info"]["error_msg"] = str(e)
        say(f"error: {e}")
        code = 1
    except Exception as e:  # a sweep records any failure and goes on
        result["run_info"]["error_msg"] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
        traceback.print_exc()
        code = 1
    result["run_info"]["total_time"] = round(time.time() - started, 2)
    atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2, ensure_ascii=False, default=str))
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m peftlab.lab.worker RUN_DIR (started by `peftlab sweep`)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _die_with_parent()
    return run(Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
