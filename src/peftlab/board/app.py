"""The board's HTTP app: five pages (plain HTML + a little JS from ``static/``) and their JSON API.

    GET  /  /new  /run?id=  /compare?runs=  /chat      the pages
    GET  /api/runs                                     the runs table
    GET  /api/schema?method=                           the form (config dataclasses)
    POST /api/check  /api/preview  /api/launch         the form: validate, data preview, launch
    POST /api/stop                                     stop a launched run
    GET  /api/run?id=   /api/run/events?id=            one run; its live progress (server-sent events)
    GET  /api/compare?runs=&runs=   POST /api/compare/generate
    POST /api/chat                                     streamed answers (server-sent events)

Safety: a token (``Authorization: Bearer``, or the cookie set by opening ``/?token=...``) is
required when one is configured, and the command refuses to listen beyond loopback without one;
on loopback the Host header must name loopback (no DNS rebinding); a POST must carry JSON (a
page on another site cannot send it without CORS, which this app never allows). Bad input is a
400 with ``{"error", "field"}``.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime

import asyncio
import hmac
import json
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import ConfigError, PeftlabError
from ..rundir import read_metrics, run_artifact
from . import compare as compare_mod
from . import forms
from .chat import ChatRoom
from .jobs import Jobs
from .workspace import Workspace, run_row, sweep_row

STATIC = Path(__file__).parent / "static"
PAGES = {"/": "runs.html", "/new": "new.html", "/run": "run.html", "/compare": "compare.html", "/chat": "chat.html"}
COOKIE = "peftlab_board"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class BoardError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def _artifacts(path: Path) -> list[dict]:
    out = []
    for d in [path, *(p for p in (path / "adapter", path / "model", path / "eval") if p.is_dir())]:
        for f in sorted(d.iterdir()):
            if f.is_file() and not f.is_symlink():
                out.append({"path": f.relative_to(path).as_posix(), "bytes": f.stat().st_size})
    return out


def create_app(ws: Workspace, *, token: str | None = None, loopback: bool = True, max_running: int = 1,
               poll_s: float = 0.5):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Query, Request
    from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse

    jobs, chat = Jobs(ws, max_running), ChatRoom(ws)

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:  # the board's own runs end with it (cleanly: SIGINT first)
            await asyncio.to_thread(jobs.stop_all)
            chat.close()

    app = FastAPI(title="peftlab board", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.jobs, app.state.chat = jobs, chat

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = request.headers.get("host", "").rsplit(":", 1)[0] if "]" not in request.headers.get(
            "host", "") else request.headers.get("host", "").split("]")[0] + "]"
        if loopback and host not in LOOPBACK_HOSTS:
            return JSONResponse({"error": f"Host {host!r} is not this machine; open the board at 127.0.0.1"},
                                status_code=403)
        if token is not None:
            given = request.query_params.get("token")
            if given is not None and request.method == "GET" and hmac.compare_digest(given.encode(), token.encode()):
                resp = RedirectResponse(request.url.path, status_code=303)
                resp.set_cookie(COOKIE, token, httponly=True, samesite="strict")
                return resp
            auth = request.headers.get("authorization", "")
            sent = auth[7:] if auth.lower().startswith("bearer ") else request.cookies.get(COOKIE, "")
            if not hmac.compare_digest(sent.encode(), token.encode()):
                return JSONResponse({"error": "a token is required: open the address the board printed "
                                              "(…/?token=…) or send 'Authorization: Bearer TOKEN'"}, status_code=401)
        if request.method == "POST" and not request.headers.get("content-type", "").startswith("application/json"):
            return JSONResponse({"error": "send the request body as JSON (Content-Type: application/json)"},
                                status_code=415)
        return await call_next(request)

    @app.exception_handler(BoardError)
    async def _board_error(request, exc: BoardError):
        return JSONResponse({"error": exc.message, "field": exc.field}, status_code=exc.status)

    @app.exception_handler(PeftlabError)
    async def _peftlab_error(request, exc: PeftlabError):
        msg = str(exc)
        return JSONResponse({"error": msg, "field": forms.field_of(msg, ())}, status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):  # a bug or an OS error: a message, never a traceback
        return JSONResponse({"error": f"the board could not do that: {type(exc).__name__}: {exc}", "field": None},
                            status_code=500)

    async def body(request: Request) -> dict:
        try:
            data = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise BoardError(400, "the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise BoardError(400, "the request body must be a JSON object")
        return data

    for route, page in PAGES.items():
        app.add_api_route(route, (lambda p: lambda: FileResponse(STATIC / p))(page), methods=["GET"],
                          include_in_schema=False)

    @app.get("/static/{name}")
    def static(name: str):
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise BoardError(404, f"no static file {name!r}")
        return FileResponse(path)

    def rows() -> list[dict]:
        running = jobs.running()
        run_ids, sweep_ids = ws.find()
        out = [run_row(ws, rid, running) for rid in run_ids]
        out += [sweep_row(ws, sid, out) for sid in sweep_ids]
        return [asdict(r) for r in out]

    @app.get("/api/runs")
    def api_runs():
        return {"workspace": str(ws.root), "runs": rows(), "running": sorted(jobs.running()),
                "max_running": jobs.max_running}

    @app.get("/api/schema")
    def api_schema(method: str = "lora"):
        return forms.schema(method)

    @app.post("/api/check")
    async def api_check(request: Request):
        data = await body(request)
        return forms.check(ws, data.get("values") or {}, data.get("name"))

    @app.post("/api/preview")
    async def api_preview(request: Request):
        from .preview import preview

        data = await body(request)
        return await asyncio.to_thread(preview, ws, data.get("values") or {}, data.get("index", 0))

    @app.post("/api/launch")
    async def api_launch(request: Request):
        data = await body(request)
        if not data.get("name"):
            raise BoardError(400, "name: give the run a name (letters, digits, '.', '_', '-')", "name")
        checked = forms.check(ws, data.get("values") or {}, data["name"])
        if not checked["ok"]:
            raise BoardError(400, checked["error"], checked["field"])
        run_id = f"runs/{data['name']}"
        jobs.launch(run_id, checked["overrides"][:-1] + [f"train.output_dir={run_id}"], checked["target_steps"])
        return {"run": run_id, "cli": checked["cli"]}

    @app.post("/api/stop")
    async def api_stop(request: Request):
        run_id = (await body(request)).get("run")
        if not isinstance(run_id, str):
            raise BoardError(400, "run: give the run's id, e.g. runs/NAME", "run")
        ws.run_dir(run_id)
        return await asyncio.to_thread(jobs.stop, run_id)

    def run_state(run_id: str) -> dict:
        path = ws.run_dir(run_id, "id")
        row = run_row(ws, run_id, jobs.running())
        cfg = path / "config.yaml"
        return {"row": asdict(row), "log": ws.log_tail(run_id),
                "config": cfg.read_text(encoding="utf-8", errors="replace") if cfg.is_file() else "",
                "artifacts": _artifacts(path) if path.is_dir() else [],
                "artifact": str(run_artifact(path)) if path.is_dir() and run_artifact(path) else None,
                "command": (ws.record(run_id) or {}).get("command")}

    @app.get("/api/run")
    def api_run(id: str):
        return {**run_state(id), "metrics": read_metrics(ws.root / id)}

    @app.get("/api/run/events")
    async def api_run_events(id: str):
        ws.run_dir(id, "id")

        async def events():
            sent = 0
            while True:
                metrics = read_metrics(ws.root / id)
                state = await asyncio.to_thread(run_state, id)
                yield f"data: {json.dumps({**state, 'metrics': metrics[sent:], 'from': sent})}\n\n"
                sent = len(metrics)
                if state["row"]["status"] != "running":
                    yield "data: [DONE]\n\n"
                    return
                await asyncio.sleep(poll_s)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/api/compare")
    def api_compare(runs: list[str] = Query(default=[])):  # noqa: B008 (FastAPI's list query parameter)
        return compare_mod.compare(ws, list(runs))

    @app.post("/api/compare/generate")
    async def api_compare_generate(request: Request):
        data = await body(request)
        return await asyncio.to_thread(compare_mod.generate, ws, data.get("runs"), data.get("prompts"),
                                       data.get("max_new_tokens", 48))

    @app.post("/api/chat")
    async def api_chat(request: Request):
        data = await body(request)
        gen = chat.stream(data.get("prompt"), data.get("runs"), data.get("max_tokens", 64), bool(data.get("base", True)))
        try:
            first = await gen.__anext__()  # errors (bad runs, bad prompt) become a 400 before streaming
        except ConfigError as e:
            raise BoardError(400, str(e), "runs" if str(e).startswith("runs") else "prompt") from None

        async def rest():
            yield first
            async for chunk in gen:
                yield chunk

        return StreamingResponse(rest(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    app.state.started = time.time()
    return app
