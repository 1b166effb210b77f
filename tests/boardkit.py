"""Helpers for the board's tests: a real uvicorn server on a free loopback port, in this process
(the board's runs are real ``peftlab train`` subprocesses), and the tiny run settings."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

from conftest import TINY

# the tiny Llama of conftest as the form's fields (one text per key, as a user would type them)
TINY_RUN = {
    "model.name": "config:llama",
    "model.config_overrides": "{" + ", ".join(f"{k}: {v}" for k, v in TINY["llama"].items()) + "}",
    "data.max_length": "64",
    "data.eval_split": "16",
    "train.batch_size": "4",
    "train.eval_every": "3",
    "train.eval_batches": "2",
    "train.threads": "1",
}


@contextmanager
def board_server(workspace, **kwargs):
    """``create_app(Workspace(workspace), **kwargs)`` served by uvicorn; yields (base url, app)."""
    import uvicorn

    from peftlab.board.app import create_app
    from peftlab.board.workspace import Workspace

    app = create_app(Workspace(workspace), **kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "the board did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(30)


def wait_for(predicate, timeout: float, what: str, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
