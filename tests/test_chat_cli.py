"""`peftlab chat`, driven for real: the CLI in a pseudo-terminal, typed at line by line. Every reply
must equal greedy generation (HF generate) on the same conversation rendered with the training
template and the adapter that was active."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import time

import torch

from conftest import tokenizer_for
from peftlab.data.tokenize import Encoder
from peftlab.export.adapter import load_adapter
from shipkit import cli, cli_env, load_base, make_adapter, save_tiny_base

N = 8  # --max-new-tokens
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _reply(base, adapter_dir, messages, n=N):
    tok = tokenizer_for("llama")
    ids = Encoder(tok, "auto").prompt_ids(messages)
    model, _ = load_base(base)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


class Terminal:
    """A child process on a pty: type lines, read until the next `you> ` prompt."""

    def __init__(self, argv, env):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=subprocess.DEVNULL, env=env,
                                     close_fds=True)
        os.close(slave)
        self.buffer = ""

    def read_until(self, marker: str, timeout: float = 120) -> str:
        deadline = time.time() + timeout
        while marker not in self.buffer:
            if time.time() > deadline:
                raise AssertionError(f"no {marker!r} within {timeout}s; screen so far:\n{self.buffer[-3000:]}")
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if ready:
                try:
                    text = os.read(self.master, 4096).decode("utf-8", "replace").replace("\r\n", "\n")
                    self.buffer += ANSI.sub("", text)  # readline's terminal control sequences
                except OSError:
                    break
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def type(self, line: str) -> str:
        os.write(self.master, (line + "\n").encode())
        text = self.read_until("you> ")
        return text.split("\n", 1)[1] if "\n" in text else text  # drop the echo of what was typed

    def close(self):
        try:
            os.write(self.master, b"/quit\n")
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.master)


def test_chat_streams_multi_turn_switch_and_reset(tmp_path):
    base = save_tiny_base("llama", tmp_path / "base")
    alpha = make_adapter(base, tmp_path / "alpha", r=4, seed=50)
    beta = make_adapter(base, tmp_path / "adapters" / "beta", r=2, targets=["q_proj", "up_proj"], seed=51)
    term = Terminal(cli("chat", f"model.name={base}", "--adapter", f"alpha={alpha}", "--adapters",
                        str(tmp_path / "adapters"), "--max-new-tokens", str(N), "--threads", "1"), cli_env(TERM="dumb"))
    try:
        banner = term.read_until("you> ")
        assert "adapter alpha" in banner and "beta" in banner
        history = [{"role": "user", "content": "Hello there"}]
        r1 = _reply(base, alpha, history)
        assert term.type("Hello there") == f"alpha> {r1}\n"
        history += [{"role": "assistant", "content": r1}, {"role": "user", "content": "And then?"}]
        r2 = _reply(base, alpha, history)  # the second turn sees the first (multi-turn history)
        assert term.type("And then?") == f"alpha> {r2}\n"
        assert term.type("/adapter beta") == "(adapter: beta)\n"
        history += [{"role": "assistant", "content": r2}, {"role": "user", "content": "Third"}]
        assert term.type("Third") == f"beta> {_reply(base, beta, history)}\n"
        assert term.type("/reset") == "(conversation reset)\n"
        fresh = [{"role": "user", "content": "Third"}]
        r4 = _reply(base, beta, fresh)
        assert term.type("Third") == f"beta> {r4}\n"
        assert "not a valid adapter name" in term.type("/adapter ../alpha")
        assert "no adapter named 'gamma'; available: alpha, beta" in term.type("/adapter gamma")
        assert term.type("/adapter base") == "(adapter: base)\n"
        fresh += [{"role": "assistant", "content": r4}, {"role": "user", "content": "Third"}]
        assert term.type("Third") == f"base> {_reply(base, None, fresh)}\n"  # switching keeps the history
        assert r1 != r2 and len(r1) > 0
    finally:
        term.close()
    assert term.proc.returncode == 0


def test_chat_through_a_pipe(tmp_path):
    """Not a terminal: no prompts, end of input ends the chat with status 0."""
    base = save_tiny_base("gpt2", tmp_path / "base")
    a = make_adapter(base, tmp_path / "a", r=2, seed=52)
    proc = subprocess.run(cli("chat", f"model.name={base}", "data.template=alpaca", "--adapter", str(a),
                              "--max-new-tokens", "5", "--threads", "1"),
                          input="hi\n/adapters\n", env=cli_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    tok = tokenizer_for("gpt2")
    ids = Encoder(tok, "alpaca").prompt_ids([{"role": "user", "content": "hi"}])
    model, _ = load_base(base)
    load_adapter(model, a)
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    assert f"a> {tok.decode(out[0, len(ids):], skip_special_tokens=True)}\n" in proc.stdout
    assert "adapters: a; active: a" in proc.stdout and "you> " not in proc.stdout


def test_chat_with_lookup_gives_the_same_replies(tmp_path, monkeypatch, capsys):
    """--lookup 4, run in this process to read the engine's counts: every reply of a two-turn chat
    equals greedy generation on the conversation, and drafts were accepted on the way; with a
    temperature above 0 the flag is refused before anything loads."""
    from peftlab import cli as peftlab_cli
    from peftlab.serve import loading

    base = save_tiny_base("llama", tmp_path / "base")
    alpha = make_adapter(base, tmp_path / "alpha", r=4, seed=50)
    built, build = [], loading.build_serving
    monkeypatch.setattr(loading, "build_serving", lambda *a, **kw: built.append(build(*a, **kw)) or built[-1])
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nAnd then?\n"))
    code = peftlab_cli.main(["chat", f"model.name={base}", "--adapter", f"alpha={alpha}", "--max-new-tokens", "16",
                             "--lookup", "4"])
    out = capsys.readouterr().out
    assert code == 0
    history = [{"role": "user", "content": "Hello there"}]
    r1 = _reply(base, alpha, history, 16)
    history += [{"role": "assistant", "content": r1}, {"role": "user", "content": "And then?"}]
    assert f"alpha> {r1}\nalpha> {_reply(base, alpha, history, 16)}\n" in out
    stats = built[0].engine.stats
    assert built[0].engine.lookup == 4 and 0 < stats["lookup_accepted"] <= stats["lookup_drafted"], stats
    code = peftlab_cli.main(["chat", f"model.name={base}", "--lookup", "4", "--temperature", "0.7"])
    err = capsys.readouterr().err
    assert code == 2 and "--lookup 4" in err and "greedy only" in err and "--temperature 0.7" in err
    assert len(built) == 1
