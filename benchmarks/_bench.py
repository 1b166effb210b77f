"""Shared pieces of the benchmarks: subprocess workers, alternation, medians, GEMM peak, RSS.

Every measured configuration runs in its own subprocess (so each has its own peak RSS and no
allocator state carries over), the configurations alternate within every repeat (so a noisy
neighbour hurts all of them alike), and the figures are medians over repeats.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_gb() -> float:
    """This process's peak resident set size (GB, 1e9 bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def worker_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra or {})
    return env


def busy_cores(window: float = 0.5) -> float:
    """Cores' worth of CPU time other processes used over ``window`` seconds (from /proc/stat)."""
    def snap():
        with open("/proc/stat") as f:
            vals = list(map(int, f.readline().split()[1:]))
        return vals[3] + vals[4], sum(vals)

    (i0, t0), _ = snap(), time.sleep(window)
    i1, t1 = snap()
    n = os.cpu_count() or 1
    return n * (1 - (i1 - i0) / max(t1 - t0, 1))


def wait_quiet(max_wait: float, threshold: float = 0.3) -> float:
    """Wait (up to ``max_wait`` s) until the machine is idle; returns the busy cores seen last."""
    end = time.time() + max_wait
    busy = busy_cores()
    while busy > threshold and time.time() < end:
        time.sleep(2)
        busy = busy_cores()
    return busy


def run_worker(script: Path, spec: dict, env_extra: dict | None = None, timeout: float = 3600,
               wait: float = 0.0) -> dict:
    """Run ``script --worker JSON`` and return the JSON object it prints last (after waiting up
    to ``wait`` seconds for other processes to leave the cores alone)."""
    busy = wait_quiet(wait) if wait > 0 else None
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(script), "--worker", json.dumps(spec)], capture_output=True,
                          text=True, env=worker_env(env_extra), timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"worker {spec.get('name')} failed (exit {proc.returncode})")
    out = json.loads(lines[-1])
    out["wall_s"] = round(time.time() - t0, 1)
    out["busy_cores_before"] = None if busy is None else round(busy, 2)
    return out


def cpu_info() -> dict:
    """The CPU's model name and its vector flags (avx*, amx*, fma): the CPU class a figure belongs to."""
    text = Path("/proc/cpuinfo").read_text()
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return {"cpu": name, "cpu_flags": sorted(f for f in set(flags) if f.startswith(("avx", "amx")) or f == "fma")}


def side_by_side(script: Path, spec_of, repeats: int, show: tuple[str, ...], summary, setup: dict, out: str) -> dict:
    """peftlab's and the peer's workers (``script --worker``, ``spec_of(name)``), one thread each, run
    alternately ``repeats`` times; prints each run's ``show`` keys, writes the JSON report (CPU class,
    ``setup``, ``summary(results)``, every run) to ``out`` and prints the summary."""
    results = []
    for name in alternate(["peftlab", "trl"], repeats):
        r = run_worker(script, spec_of(name), {"OMP_NUM_THREADS": "1"})
        print(f"{name}: {json.dumps({k: r[k] for k in show})}", file=sys.stderr)
        results.append(r)
    report = {**cpu_info(), "setup": setup, "summary": summary(results), "runs": results}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))
    return report


def alternate(names: list[str], repeats: int) -> list[str]:
    """Run order: every repeat runs every name once, the order rotating by one each repeat."""
    order = []
    for r in range(repeats):
        k = r % len(names)
        order += names[k:] + names[:k]
    return order


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def gemm_peak(threads: int, seconds: float = 2.0, bf16: bool = True) -> dict:
    """Measured GFLOP/s of torch.mm here and now: square 2048 and the model's [T,576]@[576,1536];
    bf16 only when asked (without native bf16 its GEMM takes minutes at 0.3-1.3 GFLOP/s)."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    shapes = {"square_2048": (2048, 2048, 2048), "T2048x576x1536": (2048, 576, 1536)}
    for dtype in (torch.float32, torch.bfloat16) if bf16 else (torch.float32,):
        for name, (m, k, n) in shapes.items():
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            for _ in range(3):
                a @ b
            times, t_end = [], time.perf_counter() + seconds
            while time.perf_counter() < t_end or len(times) < 5:
                t0 = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t0)
            # the best quartile: the peak the hardware reaches, not the neighbours' noise
            times.sort()
            best = statistics.median(times[: max(1, len(times) // 4)])
            out[f"{str(dtype).replace('torch.', '')}_{name}"] = round(2 * m * k * n / best / 1e9, 1)
    return out


def fmt_table(rows: list[list], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in cells[1:]])
