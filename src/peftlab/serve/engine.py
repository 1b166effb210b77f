"""Continuous batching over many adapters: one scheduler steps every active sequence together.

Orca-style iteration-level scheduling (Yu et al., OSDI 2022) with S-LoRA's mixed-adapter batches:

    each step:  drop finished/cancelled rows  ->  admit waiting requests (up to max_batch) whose
                adapter is (or can be made) resident  ->  prefill the admitted prompts as one
                left-padded mixed-adapter batch, merge their KV cache into the running one  ->
                one decode forward for every running row (each row with its own adapter)  ->
                sample, stream text, finish rows on eos / stop string / max_tokens

The KV cache is one ``DynamicCache`` for the running batch, left-padded: row b's real tokens are
where ``mask[b] == 1``; positions come from the per-row count of real tokens, so a row computes
exactly what it would alone (the tests check token-for-token equality with single-row runs). Rows
joining or leaving re-pack the cache (pad/select along the batch and sequence dimensions).

Waiting requests sit in a bounded queue (``submit`` raises ``EngineBusy`` when it is full).
Adapters come from an ``AdapterStore`` (an LRU of resident adapters; an adapter in use by a running
row is never evicted). Sampling: greedy, or temperature + top-p with a per-request seed.

Prompt lookup (``lookup`` > 0; model/lookup.py, Saxena 2023): a decode step whose batch is one
greedy row (temperature 0) drafts up to ``lookup`` tokens from that row's own text and checks them
in the same forward, ``[x_last, d_1..d_k]`` -> greedy choices ``p_0..p_k``; the drafts up to the
first ``d_i != p_{i-1}`` are emitted, then that choice (each through the usual eos / stop string /
max_tokens checks, so a row can end inside a run), and the cache is cropped past the rejected
drafts. Every emitted token is the row's greedy choice given the tokens before it (exactly so in
exact arithmetic; a forward over several positions can round differently from one at a time,
which only matters at a near tie, as in model/lookup.py). A step with two or more rows, or one
sampling row, decodes one token per row as without lookup.

Limitation: sliding-window attention layers are served with a full cache (correct while a
sequence is shorter than the window).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, PeftlabError
from ..model import lookup as prompt_lookup
from ..model.kv_cache import cache_arg, join_caches, map_cache, output_cache
from .multi_lora import MultiLoRAModel


class EngineBusy(PeftlabError):
    """The waiting queue is full; try again later (HTTP 429)."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 10.0:
            raise ConfigError(f"temperature must be in [0, 10], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


_ids = itertools.count(1)


@dataclass(eq=False)
class Sequence:
    """One request: prompt tokens, adapter (None = base), sampling; the engine fills in the rest.

    ``on_event(seq, kind, data)`` is called from the engine thread with kind "text" (a new piece of
    text), "done" (data = finish reason: stop | length | cancelled) or "error" (data = message).
    """

    prompt_ids: list[int]
    adapter: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    on_event: Callable[[Sequence, str, object], None] | None = None
    id: int = field(default_factory=lambda: next(_ids))
    generated: list[int] = field(default_factory=list)
    text: str = ""  # text emitted so far (stop strings cut off)
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False
    created: float = field(default_factory=time.time)
    _generator: torch.Generator | None = None
    _held: bool = False  # the engine holds this sequence's adapter in the store
    _done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def _emit(self, kind: str, data: object) -> None:
        if self.on_event is not None:
            self.on_event(self, kind, data)


class Engine:
    """Runs ``Sequence``s on a ``MultiLoRAModel``: ``step()`` by hand, or ``start()`` a thread."""

    def __init__(self, mm: MultiLoRAModel, tokenizer, *, store=None, max_batch: int = 8, max_queue: int = 64,
                 eos_ids: set[int] | None = None, max_context: int | None = None, lookup: int = 0):
        if max_batch < 1 or max_queue < 1:
            raise ConfigError(f"max_batch and max_queue must be >= 1, got {max_batch}, {max_queue}")
        prompt_lookup.check_setting(lookup)  # sampling requests decode without it (module docstring)
        self.mm = mm
        self.tokenizer = tokenizer
        self.store = store
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.lookup = lookup  # prompt-lookup drafts per forward for a lone greedy row (0: off)
        self.eos_ids = set(eos_ids if eos_ids is not None else [tokenizer.eos_token_id])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        positions = getattr(mm.config, "max_position_embeddings", None) or getattr(mm.config, "n_positions", None)
        self.max_context = min(x for x in (max_context, positions) if x) if (max_context or positions) else 4096
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cache = None  # DynamicCache of the running rows
        self.mask: torch.Tensor | None = None  # [rows, L] 1 = real token
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.stats = {"steps": 0, "prefills": 0, "tokens": 0, "max_rows": 0, "cancelled": 0}
        if lookup:  # forwards that carried a draft, draft tokens proposed and accepted
            self.stats.update(lookup_forwards=0, lookup_drafted=0, lookup_accepted=0)

    # -- submitting ---------------------------------------------------------------------------

    def submit(self, seq: Sequence) -> Sequence:
        seq.params.validate()
        if not seq.prompt_ids:
            raise ConfigError("the prompt is empty")
        if len(seq.prompt_ids) + seq.params.max_tokens > self.max_context:
            raise ConfigError(
                f"the prompt has {len(seq.prompt_ids)} tokens and max_tokens is {seq.params.max_tokens}: "
                f"{len(seq.prompt_ids) + seq.params.max_tokens} > the context limit {self.max_context}; "
                "shorten the prompt or lower max_tokens"
            )
        if seq.adapter is not None and self.store is None and seq.adapter not in self.mm.adapters:
            raise ConfigError(f"no adapter named {seq.adapter!r} is loaded")
        if seq.params.seed is not None:
            seq._generator = torch.Generator(device=self.mm.device).manual_seed(seq.params.seed)
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise EngineBusy(f"the server is busy: {len(self.waiting)} requests are waiting (limit "
                                 f"{self.max_queue}); retry later")
            self.waiting.append(seq)
        self._wake.set()
        return seq

    def generate(self, seqs: list[Sequence]) -> list[Sequence]:
        """Submit ``seqs`` and step until all are done (in this thread; no engine thread running)."""
        for s in seqs:
            self.submit(s)
        while not all(s.done for s in seqs):
            self.step()
        return seqs

    # -- the thread -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="peftlab-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.step()
            except Exception as e:  # never let the server hang: fail what is running, keep serving
                self._fail_all(f"internal error: {type(e).__name__}: {e}")
                busy = False
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()

    def cancel(self, seq: Sequence) -> None:
        """Ask the engine thread to finish ``seq`` as cancelled (safe from any thread): a waiting
        request leaves the queue and a running row the batch at the next step."""
        seq.cancel()
        self._wake.set()

    def abort(self, seq: Sequence) -> None:
        """Finish ``seq`` as cancelled now, wherever it is. After a ``step`` interrupted half-way (Ctrl-C
        in ``peftlab chat``) the cache may be torn, so a lone running row takes the cache with it."""
        seq.cancel()
        self._remove_waiting(seq)
        if seq in self.running and len(self.running) == 1:
            self._finish(seq, "cancelled")
            self.running, self.cache, self.mask = [], None, None
        elif seq in self.running:
            self._drop([seq], "cancelled")
        self._finish(seq, "cancelled")

    def _fail_all(self, message: str) -> None:
        for seq in list(self.running):
            self._finish(seq, None, error=message)
        self.running, self.cache, self.mask = [], None, None

    # -- one step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> bool:
        """Admit, prefill, decode once; returns whether there was anything to do."""
        self._drop([s for s in self.running if s.cancelled], "cancelled")
        with self._lock:
            gone = [s for s in self.waiting if s.cancelled]
        for seq in gone:  # free their places in the queue now, not when a batch slot frees up
            self._remove_waiting(seq)
            self._finish(seq, "cancelled")
        admitted = self._admit()
        if not self.running and not admitted:
            return False
        self.stats["steps"] += 1
        if admitted:
            try:
                self._prefill(admitted)
            except BaseException as e:  # the admitted rows are in no list yet: finish them here
                for seq in admitted:
                    if seq not in self.running:
                        self._finish(seq, None, error=f"{type(e).__name__}: {e}")
                raise
        if self.running:
            self._decode()
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self.running))
        return True

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        with self._lock:
            candidates = list(self.waiting)
        for seq in candidates:
            if len(self.running) + len(admitted) >= self.max_batch:
                break
            if seq.cancelled:
                self._remove_waiting(seq)
                self._finish(seq, "cancelled")
                continue
            if seq.adapter is not None and self.store is not None:
                try:
                    if not self.store.acquire(seq.adapter):
                        continue  # every resident adapter is busy; try a later request
                    seq._held = True
                except Exception as e:  # a damaged adapter fails its request, not the engine
                    self._remove_waiting(seq)
                    self._finish(seq, None, error=str(e))
                    continue
            self._remove_waiting(seq)
            admitted.append(seq)
        return admitted

    def _remove_waiting(self, seq: Sequence) -> None:
        with self._lock:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass

    def _forward(self, input_ids, attention_mask, position_ids, cache, adapters, last_only: bool = True):
        """(logits [rows, V] of the last position, or [rows, T, V] of every one, the cache)."""
        with self.mm.route(adapters):
            out = self.mm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=True, **{cache_arg(self.mm.model): cache})
        logits = out.logits[:, -1, :] if last_only else out.logits
        return logits.float(), output_cache(out)

    def _prefill(self, seqs: list[Sequence]) -> None:
        from transformers import DynamicCache

        device = self.mm.device
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
            mask[i, width - len(s.prompt_ids):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions, DynamicCache(), [s.adapter for s in seqs])
        self.stats["prefills"] += 1
        pad = ~mask.bool()[:, None, :, None]
        self._join(seqs, map_cache(cache, lambda t: t.masked_fill(pad, 0)), mask)  # pads hold 0, never NaN
        tokens = self._sample(logits, seqs)
        self._accept(seqs, tokens)

    def _join(self, seqs: list[Sequence], cache, mask: torch.Tensor) -> None:
        """Append rows (their ``cache`` and ``mask``) to the running batch, left-padding to one length."""
        if self.cache is None or not self.running:
            self.cache, self.mask, self.running = cache, mask, list(seqs)
            return
        length = max(self.mask.shape[1], mask.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:  # left-pad the sequence dimension to `length`
            n = length - t.shape[dim]
            return torch.nn.functional.pad(t, (0, 0) * (-dim - 1) + (n, 0)) if n else t

        self.cache = join_caches(self.cache, cache, lambda old, new: torch.cat([pad(old, -2), pad(new, -2)]))
        self.mask = torch.cat([pad(self.mask, -1), pad(mask, -1)])
        self.running = self.running + list(seqs)

    def _decode(self) -> None:
        device = self.mm.device
        seqs = [s for s in self.running if s.generated]
        assert len(seqs) == len(self.running)
        if self.lookup and len(seqs) == 1 and seqs[0].params.temperature <= 0:
            return self._decode_lookup(seqs[0])
        last = torch.tensor([[s.generated[-1]] for s in seqs], dtype=torch.long, device=device)
        positions = self.mask.sum(1, keepdim=True)
        self.mask = torch.cat([self.mask, torch.ones((len(seqs), 1), dtype=self.mask.dtype, device=device)], 1)
        logits, self.cache = self._forward(last, self.mask, positions, self.cache, [s.adapter for s in seqs])
        tokens = self._sample(logits, seqs)
        self._accept(seqs, tokens)

    def _decode_lookup(self, s: Sequence) -> None:
        """One forward for the lone greedy row ``s``: its last token and up to ``lookup`` drafted ones
        (module docstring). The cache keeps the K/V of the last token and the accepted drafts."""
        device = self.mm.device
        text = torch.tensor(s.prompt_ids + s.generated)
        room = min(s.params.max_tokens - len(s.generated),  # a draft past this could never be emitted
                   self.max_context - len(text)) - 1
        d = prompt_lookup.draft(text, min(self.lookup, room))
        ids = torch.cat([text[-1:], d])[None].to(device)  # [1, 1 + k]
        width = self.mask.shape[1]
        positions = self.mask.sum(1, keepdim=True) + torch.arange(ids.shape[1], device=device)
        mask = torch.cat([self.mask, torch.ones_like(ids, dtype=self.mask.dtype)], 1)
        logits, cache = self._forward(ids, mask, positions, self.cache, [s.adapter], last_only=False)
        preds = logits[0].argmax(-1).cpu()  # [1 + k]: p_i, the greedy choice after x_last, d_1..d_i
        j = int((d == preds[:-1]).long().cumprod(0).sum())  # drafts accepted
        keep = width + 1 + j  # the rejected drafts' K/V go; the next forward starts at p_j's position
        self.cache = map_cache(cache, lambda t: t[..., :keep, :])
        self.mask = mask[:, :keep]
        if len(d):
            self.stats["lookup_forwards"] += 1
            self.stats["lookup_drafted"] += len(d)
            self.stats["lookup_accepted"] += j
        for tok in [*d[:j].tolist(), int(preds[j])]:
            self._accept([s], [tok])  # eos, a stop string or max_tokens can end the row inside the run
            if s.done:
                break

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        out = logits.argmax(-1).tolist()  # greedy rows: one device sync for the whole batch
        for i, (row, s) in enumerate(zip(logits, seqs)):
            p = s.params
            if p.temperature <= 0:
                continue
            probs = torch.softmax(row / p.temperature, -1)
            if p.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(-1) - sorted_p < p.top_p  # the smallest set whose mass reaches top_p
                sorted_p = sorted_p * keep
                probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
            out[i] = int(torch.multinomial(probs, 1, generator=s._generator))
        return out

    def _accept(self, seqs: list[Sequence], tokens: list[int]) -> None:
        finished = []
        for s, tok in zip(seqs, tokens):
            if s.cancelled:
                finished.append((s, "cancelled"))
                continue
            self.stats["tokens"] += 1
            if tok in self.eos_ids:
                s.generated.append(tok)
                finished.append((s, "stop"))
                continue
            s.generated.append(tok)
            reason = self._emit_text(s)
            if reason is None and len(s.generated) >= s.params.max_tokens:
                reason = "length"
            if reason is None and len(s.prompt_ids) + len(s.generated) >= self.max_context:
                reason = "length"
            if reason is not None:
                finished.append((s, reason))
        if finished:
            self._drop([s for s, _ in finished], None, reasons={id(s): r for s, r in finished})

    def _emit_text(self, s: Sequence) -> str | None:
        """Send the new text of ``s``; returns "stop" when a stop string appeared (cut off)."""
        ids = [t for t in s.generated if t not in self.eos_ids]
        full = self.tokenizer.decode(ids, skip_special_tokens=True)
        reason = None
        for stop in s.params.stop:
            at = full.find(stop)
            if at != -1:
                full, reason = full[:at], "stop"
        if reason is None:
            if full.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
                return None
            hold = max((k for stop in s.params.stop for k in range(1, len(stop)) if full.endswith(stop[:k])),
                       default=0)  # a stop string may be starting: hold its prefix back
            full = full[:len(full) - hold]
        if len(full) > len(s.text) and full.startswith(s.text):
            delta, s.text = full[len(s.text):], full
            s._emit("text", delta)
        return reason

    def _drop(self, seqs: list[Sequence], reason: str | None, reasons: dict | None = None) -> None:
        if not seqs:
            return
        gone = {id(s) for s in seqs}
        keep = [i for i, s in enumerate(self.running) if id(s) not in gone]
        for s in seqs:
            self._finish(s, (reasons or {}).get(id(s), reason))
        if not keep:
            self.running, self.cache, self.mask = [], None, None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        start = int((mask.sum(0) > 0).nonzero()[0])  # columns that are padding in every remaining row
        self.mask = mask[:, start:]
        self.cache = map_cache(self.cache, lambda t: t.index_select(0, idx)[..., start:, :])
        self.running = [self.running[i] for i in keep]

    def _finish(self, seq: Sequence, reason: str | None, error: str | None = None) -> None:
        if seq.done:
            return
        if seq._held:
            self.store.release(seq.adapter)
            seq._held = False
        if error is not None:
            seq.error, seq.finish_reason = error, "error"
            seq._emit("error", error)
        else:
            if reason == "stop" or reason == "length":
                self._flush_text(seq)
            seq.finish_reason = reason
            self.stats["cancelled"] += reason == "cancelled"
            seq._emit("done", reason)
        seq._done.set()

    def _flush_text(self, seq: Sequence) -> None:
        """At the end, text held back for a possible stop string or a partial character goes out."""
        ids = [t for t in seq.generated if t not in self.eos_ids]
        full = self.tokenizer.decode(ids, skip_special_tokens=True)
        for stop in seq.params.stop:
            at = full.find(stop)
            if at != -1:
                full = full[:at]
        if len(full) > len(seq.text) and full.startswith(seq.text):
            delta, seq.text = full[len(seq.text):], full
            seq._emit("text", delta)
