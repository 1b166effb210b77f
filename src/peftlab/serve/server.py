"""An OpenAI-compatible HTTP server over one base model and many LoRA adapters.

    GET  /v1/models             the base model and every adapter in the adapters directory
    POST /v1/completions        raw-text prompts
    POST /v1/chat/completions   messages, rendered with the training template (peftlab's Encoder)
    GET  /health

``model`` picks the adapter (the base model's name picks no adapter). ``stream: true`` sends
Server-Sent Events (``data: {chunk}`` ... ``data: [DONE]``). All requests feed one ``Engine``
(continuous batching across adapters, bounded queue). Errors use OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``: 400 bad JSON / bad field / prompt too long
(``context_length_exceeded``), 401 bad API key, 404 unknown model, 413 body too large, 429 queue
full. FastAPI and uvicorn come from the ``serve`` extra: ``pip install 'peftlab[serve]'``.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ..data.tokenize import adds_bos
from ..errors import ConfigError, DataError, PeftlabError
from .engine import Engine, EngineBusy, SamplingParams, Sequence
from .store import AdapterStore, UnknownAdapter

UNSUPPORTED = {  # field: (value that is fine, why)
    "n": (1, "n > 1 is not supported; send separate requests"),
    "best_of": (1, "best_of is not supported"),
    "echo": (False, "echo is not supported"),
    "logprobs": (None, "logprobs are not supported"),
    "top_logprobs": (None, "logprobs are not supported"),
    "tools": (None, "tool calls are not supported"),
    "functions": (None, "function calls are not supported"),
    "suffix": (None, "suffix is not supported"),
}


@dataclass
class Limits:
    max_request_bytes: int = 1_000_000
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens_completion: int = 16  # OpenAI's default for /v1/completions
    max_stop: int = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _need_serve_extra():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("peftlab serve needs FastAPI and uvicorn: pip install 'peftlab[serve]'") from None


# ---------------------------------------------------------------------------- request parsing


def _field(body: dict, name: str, kind, default=None, *, lo=None, hi=None):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind in (int, float, (int, float)) and isinstance(value, bool))
    if not ok:
        tname = {str: "a string", bool: "true or false", int: "an integer"}.get(kind, "a number")
        raise ApiError(400, f"'{name}' must be {tname}, got {json.dumps(value)[:80]}", "invalid_value", name)
    if lo is not None and value < lo or hi is not None and value > hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {value}", "invalid_value", name)
    return value


def _sampling(body: dict, limits: Limits, default_max: int) -> SamplingParams:
    for name, (fine, why) in UNSUPPORTED.items():
        if name in body and body[name] not in (fine, None):
            raise ApiError(400, why, "unsupported_parameter", name)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = default_max if max_tokens is None else _field({"max_tokens": max_tokens}, "max_tokens", int)
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"'max_tokens' must be between 1 and this server's limit {limits.max_tokens}, "
                            f"got {max_tokens}", "invalid_value", "max_tokens")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > limits.max_stop:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {limits.max_stop} of them",
                       "invalid_value", "stop")
    seed = body.get("seed")
    if seed is not None:
        seed = _field(body, "seed", int, lo=0, hi=2**63 - 1)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(_field(body, "temperature", (int, float), 1.0, lo=0, hi=2)),  # OpenAI's default
        top_p=float(_field(body, "top_p", (int, float), 1.0, lo=0, hi=1)),
        stop=tuple(stop),
        seed=seed,
    )


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}", "invalid_value", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] must be an object with role system, user or assistant",
                           "invalid_value", "messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "invalid_value",
                               "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", "invalid_value", "messages")
        out.append({"role": m["role"], "content": content})
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must have role 'user'", "invalid_value", "messages")
    return out


# ---------------------------------------------------------------------------- the two reply shapes


def _text_choice(text: str, finish: str | None) -> dict:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


@dataclass(frozen=True)
class Reply:
    """How one endpoint words its answer: the id prefix, the objects' names and the ``choices`` entry
    of each streamed chunk (an optional opening one, a text piece, the finishing one) and of the
    whole answer."""

    prefix: str
    chunk_object: str
    final_object: str
    opening: dict | None
    piece: Callable[[str], dict]
    finish: Callable[[str], dict]
    answer: Callable[[Sequence], dict]


COMPLETION = Reply("cmpl", "text_completion", "text_completion", None,
                   piece=lambda text: _text_choice(text or "", None),
                   finish=lambda reason: _text_choice("", reason),
                   answer=lambda seq: _text_choice(seq.text, seq.finish_reason))
CHAT = Reply("chatcmpl", "chat.completion.chunk", "chat.completion",
             {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
             piece=lambda text: {"index": 0, "delta": {"content": text}, "finish_reason": None},
             finish=lambda reason: {"index": 0, "delta": {}, "finish_reason": reason},
             answer=lambda seq: {"index": 0, "message": {"role": "assistant", "content": seq.text},
                                 "finish_reason": seq.finish_reason})


def _usage(seq: Sequence) -> dict:
    n = len(seq.generated)
    return {"prompt_tokens": len(seq.prompt_ids), "completion_tokens": n, "total_tokens": len(seq.prompt_ids) + n}


def _sse(chunk: dict) -> str:
    return f"data: {json.dumps(chunk)}\n\n"


# ---------------------------------------------------------------------------- the app


class Api:
    """What both completion endpoints do: authenticate, read the body, pick the adapter, check the
    length, run the sequence on the engine and answer (whole, or streamed as Server-Sent Events)."""

    def __init__(self, engine: Engine, store: AdapterStore, base_name: str, api_key: str | None, limits: Limits):
        self.engine, self.store, self.base_name, self.api_key, self.limits = engine, store, base_name, api_key, limits

    def check_key(self, request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", "invalid_api_key",
                           kind="authentication_error")

    async def read_json(self, request) -> dict:
        limit = self.limits.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"the request body is {length} bytes; the limit is {limit}", "request_too_large")
        from starlette.requests import ClientDisconnect

        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"the request body is over the limit of {limit} bytes", "request_too_large")
                chunks.append(chunk)
        except ClientDisconnect:  # nobody to answer; not a server error either
            raise ApiError(400, "the client disconnected while sending the body", "client_disconnected") from None
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
        except RecursionError:  # json's decoder refuses nesting deeper than Python's recursion limit
            raise ApiError(400, "the request body is not valid JSON: it is nested too deeply", "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", "invalid_json")
        return body

    def pick_adapter(self, body: dict) -> tuple[str, str | None]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required: the base model's name or an adapter's", "invalid_value", "model")
        if model == self.base_name:
            return model, None
        try:
            self.store.check(model)
        except UnknownAdapter as e:
            raise ApiError(404, str(e), "model_not_found", "model") from None
        except PeftlabError as e:
            raise ApiError(400, str(e), "invalid_model", "model") from None
        return model, model

    def models(self, created: int) -> dict:
        """/v1/models: the base model, then every adapter (its parent is the base)."""
        data = [{"id": self.base_name, "object": "model", "created": created, "owned_by": "peftlab",
                 "root": self.base_name, "parent": None}]
        for name in self.store.names():
            data.append({"id": name, "object": "model", "created": created, "owned_by": "peftlab", "root": name,
                         "parent": self.base_name})
        return {"object": "list", "data": data}

    async def request(self, request, default_max: int) -> tuple[dict, str, str | None, SamplingParams]:
        """(body, model, adapter, sampling) of an authenticated completion request."""
        self.check_key(request)
        body = await self.read_json(request)
        model, adapter = self.pick_adapter(body)
        return body, model, adapter, _sampling(body, self.limits, default_max)

    def check_length(self, prompt_ids: list[int], params: SamplingParams, param: str) -> None:
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", "invalid_value", "prompt")
        total, context = len(prompt_ids) + params.max_tokens, self.engine.max_context
        if total > context:
            raise ApiError(400, f"this model's context is {context} tokens; the prompt has "
                                f"{len(prompt_ids)} and max_tokens asks for {params.max_tokens} ({total} in all). "
                                "Shorten the prompt or lower max_tokens", "context_length_exceeded", param)

    async def respond(self, reply: Reply, body: dict, model: str, seq: Sequence, request):
        """Run ``seq`` and answer in ``reply``'s words: one JSON object, or (``stream: true``) its chunks."""
        from fastapi.responses import JSONResponse, StreamingResponse

        rid, created = f"{reply.prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
        stream = _field(body, "stream", bool, False)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False

        def head(obj: str) -> dict:
            return {"id": rid, "object": obj, "created": created, "model": model}

        def chunks(text: str | None, first: bool = False, finish: str | None = None):
            if first:
                if reply.opening is not None:
                    yield {**head(reply.chunk_object), "choices": [reply.opening]}
            elif finish:
                yield {**head(reply.chunk_object), "choices": [reply.finish(finish)]}
                if include_usage:
                    yield {**head(reply.chunk_object), "choices": [], "usage": _usage(seq)}
            else:
                yield {**head(reply.chunk_object), "choices": [reply.piece(text)]}

        queue = self.submit(seq)
        if not stream:
            await self.wait(seq, queue, request)
            return JSONResponse({**head(reply.final_object), "choices": [reply.answer(seq)], "usage": _usage(seq)})
        # Starlette cancels a streaming response when its client disconnects: events' finally cancels the row
        return StreamingResponse(self.events(seq, queue, chunks), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def submit(self, seq: Sequence) -> asyncio.Queue:
        """Hand ``seq`` to the engine; its events ("text", "error", "done") arrive on the returned queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seq.on_event = lambda s, kind, data: loop.call_soon_threadsafe(queue.put_nowait, (kind, data))
        try:
            self.engine.submit(seq)
        except EngineBusy as e:
            raise ApiError(429, str(e), "server_busy", kind="rate_limit_error") from None
        except PeftlabError as e:
            raise ApiError(400, str(e), "invalid_value") from None
        return queue

    async def wait(self, seq: Sequence, queue: asyncio.Queue, request) -> None:
        """Wait for ``seq`` to finish; a client that disconnects first cancels it (frees its row)."""

        async def watch() -> None:  # the body is read: the next ASGI message comes when the client leaves
            while (await request.receive())["type"] != "http.disconnect":
                pass
            queue.put_nowait(("disconnect", None))

        watcher = asyncio.create_task(watch())
        try:
            while True:
                kind, data = await queue.get()
                if kind == "error":
                    raise ApiError(500, f"generation failed: {data}", "generation_error", kind="server_error")
                if kind == "disconnect":
                    raise ApiError(400, "the client disconnected", "client_disconnected")
                if kind == "done":
                    return
        finally:
            watcher.cancel()
            if not seq.done:
                self.engine.cancel(seq)

    async def events(self, seq: Sequence, queue: asyncio.Queue, chunks):
        try:
            for chunk in chunks(None, first=True):
                yield _sse(chunk)
            while True:
                kind, data = await queue.get()
                if kind == "text":
                    for chunk in chunks(data):
                        yield _sse(chunk)
                elif kind == "error":
                    yield _sse(ApiError(500, f"generation failed: {data}", "generation_error",
                                        kind="server_error").body())
                    break
                else:
                    for chunk in chunks(None, finish=seq.finish_reason):
                        yield _sse(chunk)
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not seq.done:
                self.engine.cancel(seq)  # the client went away: free the row


def _prompt_ids(body: dict, tokenizer, bos: bool) -> list[int]:
    """/v1/completions' ``prompt``: a string, one string in a list, or a list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
        if max(ids) >= len(tokenizer) or min(ids) < 0:
            raise ApiError(400, "'prompt' holds token ids outside the vocabulary", "invalid_value", "prompt")
        return ids
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        return [tokenizer.bos_token_id, *ids] if bos else ids
    raise ApiError(400, "'prompt' must be a string (or one string in a list, or a list of token ids)",
                   "invalid_value", "prompt")


def create_app(engine: Engine, store: AdapterStore, encoder, *, base_name: str, api_key: str | None = None,
               limits: Limits | None = None):
    """A FastAPI app serving ``engine``; ``encoder`` renders chat messages (training template)."""
    _need_serve_extra()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    limits = limits or Limits()
    api = Api(engine, store, base_name, api_key, limits)
    bos = adds_bos(engine.tokenizer)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="peftlab", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(engine.running), "waiting": len(engine.waiting),
                "stats": dict(engine.stats), "resident_adapters": store.resident()}

    @app.get("/v1/models")
    async def models(request: Request):
        api.check_key(request)
        return api.models(started)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, model, adapter, params = await api.request(request, limits.default_max_tokens_completion)
        ids = _prompt_ids(body, engine.tokenizer, bos)
        api.check_length(ids, params, "prompt")
        return await api.respond(COMPLETION, body, model, Sequence(ids, adapter, params), request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body, model, adapter, params = await api.request(request, limits.max_tokens)
        messages = _messages(body)
        try:
            ids = encoder.prompt_ids(messages)
        except DataError as e:
            raise ApiError(400, str(e), "invalid_value", "messages") from None
        if not body.get("max_tokens") and not body.get("max_completion_tokens"):  # fill the context, up to the limit
            params.max_tokens = max(1, min(params.max_tokens, engine.max_context - len(ids)))
        api.check_length(ids, params, "messages")
        return await api.respond(CHAT, body, model, Sequence(ids, adapter, params), request)

    return app
