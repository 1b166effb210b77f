"""CLI subcommands: one module each, found automatically.

A module here defines ``NAME`` and ``HELP`` (strings), ``add_arguments(parser)`` and
``run(args) -> int``; ``peftlab <NAME>`` then calls it. Adding a command touches only its file.
"""
