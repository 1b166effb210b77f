"""Shared argument handling: ``[CONFIG] [key=value ...]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import Config, split_config_args
from ..configure import load_config


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "args", nargs="*", metavar="[CONFIG] [key=value]",
        help="an optional YAML config, then overrides such as peft.r=16 train.lr=1e-3",
    )


def config_from_args(args: list[str], defaults: list[str] | None = None) -> Config:
    path, overrides = split_config_args(args)
    return load_config(path, [*(defaults or []), *overrides])


def export_out(args) -> Path:
    """An export command's ``--out``, after checking its ``key=value`` overrides: a non-empty
    directory is refused unless ``--overwrite`` (merge, export)."""
    from ..errors import ConfigError

    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"unexpected argument {bad[0]!r}: give config overrides as key=value")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f"--out {str(out)!r} exists and is not empty; pass --overwrite to replace it")
    return out


def listening_socket(host: str, port: int):
    """(a socket bound to ``host``:``port``, the host as a URL shows it, the port bound: the one asked
    for, or the one the OS picked for 0) for a server's ``--host``/``--port`` (serve, board; each checks
    the port's range first, before loading anything)."""
    import socket

    from ..errors import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock, (f"[{host}]" if family == socket.AF_INET6 else host), sock.getsockname()[1]
