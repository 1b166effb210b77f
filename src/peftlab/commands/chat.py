"""peftlab chat [CONFIG] [key=value ...] [--run DIR] [--adapter NAME=DIR ...] [--adapters DIR]

An interactive terminal chat: tokens stream as they are generated, the prompt is rendered with the
training template (the same ``Encoder`` as training, so the model sees what it learned on), and
the conversation keeps its history. Commands:

    /adapter NAME   switch adapter (``/adapter base`` for none); the history is kept
    /adapters       list the adapters
    /system TEXT    set the system prompt (and reset)
    /reset          forget the conversation
    /help, /quit    (end of input quits too)

When the history no longer fits the context, the oldest turns are dropped (and it says so).
``--lookup N`` (greedy only) decodes with prompt-lookup speculative decoding: up to N tokens
drafted from the conversation so far are checked in one forward (serve/engine.py); the replies
are the same tokens.
"""

from __future__ import annotations

import sys

from ._args import add_config_arguments

NAME = "chat"
HELP = "chat in the terminal with the base model or an adapter (streaming, multi-turn, /adapter to switch)"

HELP_TEXT = """commands: /adapter NAME (base = no adapter), /adapters, /system TEXT, /reset, /help, /quit"""


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--run", help="a run directory: its base, template and adapter (selected at start)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="an adapter to load (repeatable); the first one is active at start")
    p.add_argument("--adapters", help="a directory of adapter directories, loaded on demand by /adapter NAME")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lookup", type=int, default=0, metavar="N",
                   help="prompt-lookup speculative decoding: draft up to N tokens from the conversation so far, "
                        "check them in one forward (greedy only, the same replies; faster when answers copy from "
                        "the conversation). 0 = off")
    p.add_argument("--system", default=None, help="system prompt (default: the template's)")
    p.add_argument("--threads", type=int, default=0)


class Chat:
    def __init__(self, serving, args, out=sys.stdout):
        self.s = serving
        self.args = args
        self.out = out
        self.history: list[dict] = []
        self.system = args.system
        names = list(serving.store.pinned)
        self.adapter: str | None = names[0] if names else None

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    @property
    def label(self) -> str:
        return self.adapter or "base"

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/help":
            self.say(HELP_TEXT)
        elif cmd == "/reset":
            self.history = []
            self.say("(conversation reset)")
        elif cmd == "/system":
            self.system, self.history = arg or None, []
            self.say(f"(system prompt {'set' if arg else 'cleared'}; conversation reset)")
        elif cmd == "/adapters":
            names = self.s.store.names()
            self.say("adapters: " + (", ".join(names) if names else "(none)") + f"; active: {self.label}")
        elif cmd == "/adapter":
            if not arg:
                self.say(f"active: {self.label}; /adapter NAME to switch (base = none)")
            elif arg in ("base", "none", self.s.base_name):
                self.adapter = None
                self.say("(adapter: base)")
            else:
                from ..errors import PeftlabError

                try:
                    self.s.store.check(arg)
                except PeftlabError as e:
                    self.say(f"error: {e}")
                else:
                    self.adapter = arg
                    self.say(f"(adapter: {arg})")
        else:
            self.say(f"unknown command {cmd}; {HELP_TEXT}")
        return True

    def _prompt_ids(self, messages: list[dict]) -> list[int] | None:
        """Token ids of the conversation, dropping the oldest turns while it does not fit."""
        engine, budget = self.s.engine, self.args.max_new_tokens
        system = [{"role": "system", "content": self.system}] if self.system else []
        dropped = 0
        while True:
            ids = self.s.encoder.prompt_ids(system + messages)
            if len(ids) + budget <= engine.max_context or len(messages) <= 1:
                break
            messages[:] = messages[2:]  # the oldest user/assistant pair
            dropped += 1
        if dropped:
            self.say(f"(dropped the {dropped} oldest exchange(s) to fit the context of {engine.max_context} tokens)")
        if len(ids) + budget > engine.max_context:
            self.say(f"error: the message is {len(ids)} tokens; with --max-new-tokens {budget} it does not fit the "
                     f"context of {engine.max_context}. Shorten it or lower --max-new-tokens")
            return None
        return ids

    def turn(self, text: str) -> None:
        from ..serve.engine import SamplingParams, Sequence

        self.history.append({"role": "user", "content": text})
        ids = self._prompt_ids(self.history)
        if ids is None:
            self.history.pop()
            return
        params = SamplingParams(max_tokens=self.args.max_new_tokens, temperature=self.args.temperature,
                                top_p=self.args.top_p, seed=self.args.seed)
        self.out.write(f"{self.label}> ")
        self.out.flush()

        def on_event(seq, kind, data):
            if kind == "text":
                self.out.write(data)
                self.out.flush()
            elif kind == "error":
                self.out.write(f"\nerror: {data}")

        seq = Sequence(ids, self.adapter, params, on_event=on_event)
        engine = self.s.engine
        try:
            engine.submit(seq)
            while not seq.done:
                engine.step()
        except KeyboardInterrupt:  # stop this answer, keep the chat (the batch cache is dropped whole)
            engine.abort(seq)
            self.out.write(" [interrupted]")
        self.say()
        if seq.error:
            self.history.pop()
        else:
            self.history.append({"role": "assistant", "content": seq.text})


def run(args) -> int:
    from ..model.lookup import check_setting
    from ..serve.loading import build_serving
    from ..train.runtime import set_threads

    check_setting(args.lookup, args.temperature, "--lookup", "--temperature")
    set_threads(args.threads)
    serving = build_serving(args.args, run=args.run, adapters=args.adapter, adapters_dir=args.adapters,
                            max_batch=1, max_queue=1, lookup=args.lookup)
    chat = Chat(serving, args)
    interactive = sys.stdin.isatty()
    if interactive:
        try:  # line editing and history; it also makes input() print its prompt on stdout
            import readline  # noqa: F401
        except ImportError:
            pass
    names = serving.store.names()
    chat.say(f"peftlab chat: {serving.base_name}, adapter {chat.label}"
             + (f" (available: {', '.join(names)})" if names else "") + f". {HELP_TEXT}")
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:
            chat.say()
            break
        if not interactive and line == "":
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line):
                break
            continue
        chat.turn(line)
    return 0
