"""peftlab board [--workspace DIR] [--host H] [--port 7860] [--token-file PATH] [--parallel N]"""

from __future__ import annotations

import os
import sys

from ._args import listening_socket

NAME = "board"
HELP = "a browser workbench: runs, a new-run form, live curves, compare, chat (http://127.0.0.1:7860)"


def add_arguments(p) -> None:
    p.add_argument("--workspace", default=".", help="the directory the board reads and writes (default: here)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only; any other "
                                                       "address needs a token)")
    p.add_argument("--port", type=int, default=7860, help="port (0: pick a free one and print it)")
    p.add_argument("--token-file", default=None, metavar="PATH",
                   help="require the token on this file's first line (default: $PEFTLAB_BOARD_TOKEN, none if unset)")
    p.add_argument("--parallel", type=int, default=1, help="runs the board may train at once (default 1)")


def board_token(args, environ=os.environ) -> str | None:
    from ..errors import ConfigError

    if args.token_file:
        try:
            lines = open(args.token_file, encoding="utf-8").read().splitlines()
        except OSError as e:
            raise ConfigError(f"--token-file {args.token_file!r}: {e.strerror}") from None
        if not lines or not lines[0].strip():
            raise ConfigError(f"--token-file {args.token_file!r} is empty; put the token on its first line")
        return lines[0].strip()
    return environ.get("PEFTLAB_BOARD_TOKEN") or None


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name may resolve to anything
        return False


def run(args) -> int:
    from ..board.app import create_app
    from ..board.workspace import Workspace
    from ..errors import ConfigError
    from ..serve.server import _need_serve_extra

    _need_serve_extra()
    import uvicorn

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be 0-65535, got {args.port}")
    token = board_token(args)
    loopback = is_loopback(args.host)
    if not loopback and not token:
        raise ConfigError(f"--host {args.host} would let anyone who reaches this port launch training on this "
                          "machine; set $PEFTLAB_BOARD_TOKEN or give --token-file, or listen on 127.0.0.1")
    ws = Workspace(args.workspace)
    os.chdir(ws.root)  # relative paths in run configs (a model directory, data) mean what they do for its runs
    app = create_app(ws, token=token, loopback=loopback, max_running=args.parallel)
    sock, host, port = listening_socket(args.host, args.port)
    print(f"peftlab board: workspace {ws.root}; open http://{host}:{port}/"
          + ("?token=<the token>" if token else ""), flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])  # Ctrl-C: uvicorn shuts down (the board stops its runs), then re-raises it
    except KeyboardInterrupt:
        pass
    print("peftlab board: stopped", file=sys.stderr)
    return 0
