"""One prompt to the base model and to several runs' adapters at once, through the serving engine.

The base and the template come from the first chosen run's ``config.yaml``; every chosen run's
``adapter/`` is loaded into one ``MultiLoRAModel`` (serve/multi_lora.py), and the prompts run as
one mixed-adapter batch on the continuous-batching ``Engine`` (serve/engine.py), each answer
streamed as it is decoded. The engine is kept between prompts and rebuilt when the set of runs
changes. Runs on another base, or with an adapter the engine cannot serve (it serves LoRA), are
refused with the reason.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from ..errors import ConfigError
from ..rundir import CONFIG, saved_config
from .workspace import Workspace

MAX_RUNS = 6
MAX_PROMPT_CHARS = 4000


def adapter_names(run_ids: list[str]) -> dict[str, str]:
    """run id -> the adapter's name in the engine (its last component, made unique)."""
    out: dict[str, str] = {}
    for rid in run_ids:
        name, n = rid.rsplit("/", 1)[-1], 2
        while name in out.values() or name == "base":
            name, n = f"{rid.rsplit('/', 1)[-1]}-{n}", n + 1
        out[rid] = name
    return out


class ChatRoom:
    def __init__(self, ws: Workspace):
        self.ws = ws
        self._key: tuple | None = None
        self._serving = None
        self._lock = threading.Lock()

    def _check(self, run_ids: list[str]) -> list[Path]:
        if not isinstance(run_ids, list) or not run_ids or len(run_ids) > MAX_RUNS:
            raise ConfigError(f"runs: choose 1 to {MAX_RUNS} finished runs with an adapter")
        dirs, base = [], None
        for rid in run_ids:
            d = self.ws.run_dir(rid, "runs")
            if not (d / "adapter").is_dir():
                raise ConfigError(f"runs: {rid!r} has no adapter/ yet (not finished, or a full fine-tuning run)")
            model = (saved_config(d) or {}).get("model")
            if base is None:
                base = model
            elif model != base:
                raise ConfigError(f"runs: {rid!r} was trained on another base model than {run_ids[0]!r}; "
                                  "chat compares adapters of one base")
            dirs.append(d)
        return dirs

    def serving(self, run_ids: list[str]):
        """The engine for these runs (built, or the one kept from the last prompt)."""
        dirs = self._check(run_ids)
        names = adapter_names(run_ids)
        key = tuple((names[r], str(d)) for r, d in zip(run_ids, dirs))
        with self._lock:
            if self._key != key:
                from ..serve.loading import build_serving

                self.close_locked()
                s = build_serving([str(dirs[0] / CONFIG)], adapters=[f"{n}={Path(d) / 'adapter'}" for n, d in key],
                                  served_name="base")
                s.engine.start()
                self._serving, self._key = s, key
            return self._serving, names

    def close_locked(self) -> None:
        if self._serving is not None:
            self._serving.engine.stop()
        self._serving, self._key = None, None

    def close(self) -> None:
        with self._lock:
            self.close_locked()

    async def stream(self, prompt: str, run_ids: list[str], max_tokens: int = 64, base: bool = True):
        """Server-sent events: ``{"who", "text"}`` pieces, ``{"who", "done"}`` per answer, then ``[DONE]``."""
        from ..serve.engine import SamplingParams, Sequence

        if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
            raise ConfigError(f"prompt: write a message of 1 to {MAX_PROMPT_CHARS} characters")
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 512:
            raise ConfigError(f"max_tokens must be an integer from 1 to 512, got {max_tokens!r}")
        s, names = await asyncio.to_thread(self.serving, run_ids)
        ids = s.encoder.prompt_ids([{"role": "user", "content": prompt}])
        budget = max(1, min(max_tokens, s.engine.max_context - len(ids)))
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        seqs = []
        whos = (["base"] if base else []) + [names[r] for r in run_ids]
        for who in whos:
            seq = Sequence(list(ids), None if who == "base" else who, SamplingParams(max_tokens=budget))
            seq.on_event = (lambda w: lambda _s, kind, data: loop.call_soon_threadsafe(
                queue.put_nowait, (w, kind, data)))(who)
            seqs.append(seq)
        for seq in seqs:
            s.engine.submit(seq)
        yield f"data: {json.dumps({'answers': whos})}\n\n"
        left = len(seqs)
        try:
            while left:
                who, kind, data = await queue.get()
                if kind == "text":
                    yield f"data: {json.dumps({'who': who, 'text': data})}\n\n"
                else:
                    left -= 1
                    event = {"who": who, "done": data} if kind == "done" else {"who": who, "error": str(data)}
                    yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for seq in seqs:
                if not seq.done:
                    s.engine.cancel(seq)
