"""peftlab serve [CONFIG] [key=value ...] [--adapters DIR] [--adapter NAME=DIR ...] [--port N] [--lookup N]"""

from __future__ import annotations

import os
import sys

from ._args import add_config_arguments, listening_socket

NAME = "serve"
HELP = "serve the base model and many LoRA adapters over an OpenAI-compatible HTTP API"


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--adapters", help="a directory of adapter directories, loaded on demand (model=<subdir name>)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter kept loaded at all times (repeatable)")
    p.add_argument("--run", help="a run directory: its base, template, and its adapter (named after the run)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: pick a free one and print it)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (visible in `ps`: prefer $PEFTLAB_API_KEY or "
                        "--api-key-file; default: $PEFTLAB_API_KEY, none if unset)")
    p.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="read the API key from this file (its first line)")
    p.add_argument("--served-name", default=None, help="the base model's name in the API (default: model.name)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting before 429")
    p.add_argument("--max-loaded", type=int, default=8, help="adapters resident at once (LRU)")
    p.add_argument("--host-adapters", type=int, default=1024,
                   help="adapters kept checked and parsed in host memory beyond the resident ones (LRU; 0: none)")
    p.add_argument("--max-tokens", type=int, default=1024, help="the largest max_tokens a request may ask for")
    p.add_argument("--max-context", type=int, default=None, help="prompt + max_tokens limit (default: the model's)")
    p.add_argument("--max-request-bytes", type=int, default=1_000_000)
    p.add_argument("--lookup", type=int, default=0, metavar="N",
                   help="prompt-lookup speculative decoding for greedy requests (temperature 0): while one "
                        "sequence is decoding alone, up to N tokens drafted from its own text are checked in one "
                        "forward (the same tokens); steps that decode two or more sequences, and sampling "
                        "requests, decode one token per sequence as without it. 0 = off")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: the free cores)")


def api_key(args, environ=os.environ) -> str | None:
    """The key from --api-key, --api-key-file or $PEFTLAB_API_KEY (at most one of the first two)."""
    from ..errors import ConfigError

    if args.api_key and args.api_key_file:
        raise ConfigError("give --api-key or --api-key-file, not both")
    if args.api_key_file:
        try:
            lines = open(args.api_key_file, encoding="utf-8").read().splitlines()
        except OSError as e:
            raise ConfigError(f"--api-key-file {args.api_key_file!r}: {e.strerror}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ConfigError(f"--api-key-file {args.api_key_file!r} is empty; put the key on its first line")
        return key
    return args.api_key or environ.get("PEFTLAB_API_KEY") or None


def exposure_warning(host: str, key: str | None) -> str | None:
    """A warning when the server listens beyond this machine without an API key."""
    import ipaddress

    if key:
        return None
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to anything
        pass
    return (f"warning: listening on {host} without an API key: anyone who can reach this port can use the "
            "models. Set $PEFTLAB_API_KEY or --api-key-file, or listen on 127.0.0.1")


def run(args) -> int:
    from ..errors import ConfigError
    from ..model.lookup import check_setting
    from ..serve.loading import build_serving
    from ..serve.server import Limits, _need_serve_extra, create_app
    from ..train.runtime import set_threads

    _need_serve_extra()
    import uvicorn

    if args.port < 0 or args.port > 65535:
        raise ConfigError(f"--port must be 0-65535, got {args.port}")
    check_setting(args.lookup, flag="--lookup")  # per request: only greedy requests use it
    key = api_key(args)
    warning = exposure_warning(args.host, key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    set_threads(args.threads)
    s = build_serving(args.args, run=args.run, adapters=args.adapter, adapters_dir=args.adapters,
                      max_loaded=args.max_loaded, host_max=args.host_adapters, max_batch=args.max_batch,
                      max_queue=args.max_queue,
                      max_context=args.max_context, served_name=args.served_name, lookup=args.lookup)
    limits = Limits(max_request_bytes=args.max_request_bytes, max_tokens=args.max_tokens)
    app = create_app(s.engine, s.store, s.encoder, base_name=s.base_name, api_key=key, limits=limits)
    sock, host, port = listening_socket(args.host, args.port)
    print(f"peftlab serve: {s.base_name} with adapters {', '.join(s.store.names()) or '(none)'}; "
          f"listening on http://{host}:{port}/v1" + (" (API key required)" if key else ""), flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    print("peftlab serve: stopped", file=sys.stderr)
    return 0
