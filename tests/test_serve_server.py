"""The HTTP server, for real: a uvicorn process on a loopback port, driven by the official openai
client (and httpx for what a well-behaved client never sends)."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import httpx
import openai
import pytest
import torch

from conftest import tokenizer_for
from peftlab.data.tokenize import Encoder
from peftlab.export.adapter import load_adapter
from shipkit import cli, cli_env, load_base, make_adapter, save_tiny_base

KEY = "test-key-123"


def _start(root, *args, env=None):
    """(url, process, stderr path) of `peftlab serve ARGS` on a free loopback port."""
    log = root / "stderr.txt"
    errors = log.open("w")  # a file, not a pipe nobody reads (a full pipe blocks the server)
    proc = subprocess.Popen(cli("serve", *args, "--port", "0", "--threads", "1"), env=env or cli_env(),
                            stdout=subprocess.PIPE, stderr=errors, text=True)
    errors.close()
    line = proc.stdout.readline()  # blocks until the server prints where it listens (or dies)
    if "listening on" not in line:
        proc.kill()
        pytest.fail(f"server did not start: {line!r} {log.read_text()[-2000:]}")
    url = line.split("listening on ")[1].split()[0]
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(url.replace("/v1", "/health"), timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    return url, proc, log


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("srv")
    base = save_tiny_base("llama", root / "base")
    adapters = root / "adapters"
    for i, name in enumerate(("alpha", "beta", "gamma")):
        make_adapter(base, adapters / name, r=2 + i, targets="all-linear", seed=40 + i)
    make_adapter(base, root / "outside", r=2)
    os.symlink(root / "outside", adapters / "sneaky")
    url, proc, log = _start(  # the key from the environment: not visible in `ps`
        root, f"model.name={base}", "--adapters", str(adapters), "--max-tokens", "24", "--max-context", "96",
        "--max-request-bytes", "20000", "--max-batch", "4", "--max-loaded", "2", env=cli_env(PEFTLAB_API_KEY=KEY))
    yield {"url": url, "base": base, "adapters": adapters, "proc": proc, "log": log}
    _stop(proc)


def _client(server, key=KEY):
    return openai.OpenAI(base_url=server["url"], api_key=key, max_retries=0, timeout=60)


def _reference(server, adapter, prompt_ids, n):
    tok = tokenizer_for("llama")
    model, _ = load_base(server["base"])
    if adapter:
        load_adapter(model, server["adapters"] / adapter)
    out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


def _chat_ids(messages):
    return Encoder(tokenizer_for("llama"), "auto").prompt_ids(messages)


def test_models_chat_and_streaming(server):
    client = _client(server)
    ids = [m.id for m in client.models.list().data]
    assert ids == ["base", "alpha", "beta", "gamma"]  # "sneaky" points outside: not listed
    messages = [{"role": "user", "content": "Name three colours."}]
    got = client.chat.completions.create(model="beta", messages=messages, max_tokens=10, temperature=0)
    expected = _reference(server, "beta", _chat_ids(messages), 10)
    assert got.choices[0].message.content == expected
    assert got.usage.prompt_tokens == len(_chat_ids(messages))
    # streaming (SSE): the pieces add up to the same answer
    stream = client.chat.completions.create(model="beta", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3 and "".join(pieces) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1
    # multi-turn history goes through the training template
    turns = [*messages, {"role": "assistant", "content": "red"}, {"role": "user", "content": "more"}]
    got = client.chat.completions.create(model="alpha", messages=turns, max_tokens=6, temperature=0)
    assert got.choices[0].message.content == _reference(server, "alpha", _chat_ids(turns), 6)


def _concurrent_greedy(client, server, jobs: list[tuple[str, str]], max_tokens: int) -> None:
    """Send (adapter, prompt) completions at once; each greedy answer equals HF generate's."""
    tok = tokenizer_for("llama")
    results = {}

    def call(i, model, prompt):
        results[i] = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)

    threads = [threading.Thread(target=call, args=(i, *j)) for i, j in enumerate(jobs)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    for i, (model, prompt) in enumerate(jobs):
        ids = tok(prompt, add_special_tokens=False).input_ids
        want = _reference(server, None if model == "base" else model, ids, max_tokens)
        assert results[i].choices[0].text == want, model


def test_completions_and_concurrent_mixed_adapters(server):
    client = _client(server)
    tok = tokenizer_for("llama")
    stream = client.completions.create(model="base", prompt="Once upon a time", max_tokens=8, temperature=0,
                                       stream=True)
    text = "".join(c.choices[0].text for c in stream)
    assert text == _reference(server, None, tok("Once upon a time", add_special_tokens=False).input_ids, 8)
    _concurrent_greedy(client, server, [("alpha", "The first"), ("beta", "A second prompt, longer"), ("gamma", "Third"),
                                        ("base", "Four"), ("alpha", "Fifth and last")], 12)
    health = httpx.get(server["url"].replace("/v1", "/health")).json()
    assert health["stats"]["max_rows"] >= 2  # requests really shared decode steps
    assert len(health["resident_adapters"]) <= 2  # the LRU bound held (3 adapters were used)


def test_errors(server):
    client = _client(server)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="delta", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    for evil in ("../outside", "../../etc/passwd", "sneaky", "alpha/../beta", "/etc", "%2e%2e"):
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=evil, prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="wrong").models.list()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alpha", prompt="word " * 90, max_tokens=10)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}], max_tokens=500)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server["url"] + "/chat/completions", content=b'{"model": "alpha", "messages": [', headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server["url"] + "/completions", content=b'{"model": "alpha", "prompt": "' + b"x" * 30000 + b'"}',
                   headers=headers)
    assert r.status_code == 413
    r = httpx.post(server["url"] + "/chat/completions", json={"model": "alpha", "messages": [], "max_tokens": 2},
                   headers=headers)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    # a client that drops a stream mid-way does not wedge the server
    with httpx.stream("POST", server["url"] + "/completions", headers=headers,
                      json={"model": "gamma", "prompt": "abc", "max_tokens": 24, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data:"):
                break
    ok = client.completions.create(model="gamma", prompt="abc", max_tokens=3, temperature=0)
    assert ok.choices[0].text == _reference(server, "gamma", tokenizer_for("llama")("abc",
                                            add_special_tokens=False).input_ids, 3)
    assert server["proc"].poll() is None


def _health(url):
    return httpx.get(url.replace("/v1", "/health"), timeout=5).json()


def _headers():
    return {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def _quiet_log(server):
    text = server["log"].read_text()
    assert "Traceback" not in text and "RecursionError" not in text, text[-3000:]


def test_unsupported_fields_are_400(server):
    cases = [("n", 2), ("best_of", 3), ("logprobs", 2), ("echo", True), ("suffix", "x"),
             ("tools", [{"type": "function", "function": {"name": "f"}}])]
    for endpoint, payload in (("/completions", {"prompt": "hi"}),
                              ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        for field, value in cases:
            r = httpx.post(server["url"] + endpoint, headers=_headers(), timeout=30,
                           json={"model": "alpha", "max_tokens": 2, **payload, field: value})
            assert r.status_code == 400, (endpoint, field, r.text)
            assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                         "param": field, "code": "unsupported_parameter"}
    # the values that mean "not used" are accepted
    r = httpx.post(server["url"] + "/completions", headers=_headers(), timeout=30,
                   json={"model": "alpha", "prompt": "hi", "max_tokens": 2, "n": 1, "echo": False, "logprobs": None})
    assert r.status_code == 200, r.text


def test_deeply_nested_body_is_400_not_a_crash(server):
    depth = 9000  # 18 KB: under this server's 20,000-byte cap, far over json's nesting limit
    body = b'{"model": "alpha", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
    r = httpx.post(server["url"] + "/completions", content=body, headers=_headers(), timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json" and "nested" in r.json()["error"]["message"]
    _quiet_log(server)


def test_client_leaving_during_the_body_logs_nothing(server):
    import socket

    host, port = server["url"].split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 5000\r\n\r\n" + b'{"model": "al')
        time.sleep(0.3)
    time.sleep(1.0)  # let the server notice
    assert _health(server["url"])["status"] == "ok"
    _quiet_log(server)


def test_api_key_is_not_on_the_command_line(server):
    cmdline = open(f"/proc/{server['proc'].pid}/cmdline", "rb").read()
    assert KEY.encode() not in cmdline  # it came from $PEFTLAB_API_KEY
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="wrong").models.list()


def test_lookup_server_gives_the_same_answers(server, tmp_path):
    """`peftlab serve --lookup 4` (a second server on the same base and adapters): greedy requests,
    alone or at once, streamed or not, give exactly the plain server's answers (HF generate's), with
    drafts accepted on the way (/health counts them); a sampling request is decoded without lookup
    (the same seeded answer as the plain server, no draft counted)."""
    url, proc, log = _start(tmp_path, f"model.name={server['base']}", "--adapters", str(server["adapters"]),
                            "--max-tokens", "24", "--max-context", "96", "--max-batch", "4", "--lookup", "4",
                            env=cli_env(PEFTLAB_API_KEY=KEY))
    try:
        fast = _client({"url": url})
        tok = tokenizer_for("llama")
        messages = [{"role": "user", "content": "Name three colours."}]
        got = fast.chat.completions.create(model="beta", messages=messages, max_tokens=20, temperature=0)
        expected = _reference(server, "beta", _chat_ids(messages), 20)
        assert got.choices[0].message.content == expected
        stream = fast.chat.completions.create(model="beta", messages=messages, max_tokens=20, temperature=0,
                                              stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
        text = fast.completions.create(model="base", prompt="Once upon a time", max_tokens=20, temperature=0)
        ids = tok("Once upon a time", add_special_tokens=False).input_ids
        assert text.choices[0].text == _reference(server, None, ids, 20)
        stats = _health(url)["stats"]
        assert 0 < stats["lookup_accepted"] <= stats["lookup_drafted"], stats
        _concurrent_greedy(fast, server, [("alpha", "The first"), ("gamma", "A second prompt, longer"),
                                          ("base", "Four")], 16)
        before = _health(url)["stats"]
        sampled = [c.completions.create(model="alpha", prompt="Once upon", max_tokens=12, temperature=0.8,
                                        seed=7).choices[0].text for c in (fast, _client(server))]
        assert sampled[0] == sampled[1]
        after = _health(url)["stats"]
        assert after["lookup_forwards"] == before["lookup_forwards"] and after["tokens"] > before["tokens"]
        _quiet_log({"log": log})
    finally:
        _stop(proc)

BUSY_TOKENS = 2000  # ~7 ms a token on one thread: a request that runs for ~15 s unless cancelled


@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    """One row at a time, one request waiting, long answers (disconnects, the full queue), an adapter
    made for another base, and the key read from a file."""
    root = tmp_path_factory.mktemp("busy")
    base = save_tiny_base("llama", root / "base", max_position_embeddings=4096)
    adapters = root / "adapters"
    make_adapter(base, adapters / "alpha", r=2, targets="all-linear", seed=40)
    other = save_tiny_base("llama", root / "other", hidden=32, intermediate=64)
    make_adapter(other, adapters / "foreign", r=2)
    (root / "key.txt").write_text(KEY + "\n")
    url, proc, log = _start(root, f"model.name={base}", "--adapters", str(adapters), "--api-key-file",
                            str(root / "key.txt"), "--max-tokens", str(BUSY_TOKENS), "--max-batch", "1",
                            "--max-queue", "1")
    yield {"url": url, "proc": proc, "log": log, "root": root}
    _stop(proc)


def _settled(url, within: float) -> dict:
    """/health once no row runs and none waits, or the last answer after ``within`` seconds."""
    deadline = time.time() + within
    while True:
        health = _health(url)
        if (not health["running"] and not health["waiting"]) or time.time() > deadline:
            return health
        time.sleep(0.1)


def _long(stream=False, model="base"):
    return {"model": model, "prompt": "Once upon a time", "max_tokens": BUSY_TOKENS, "temperature": 0,
            "stream": stream}


def test_disconnect_cancels_the_row(busy):
    url = busy["url"]
    for stream in (False, True):
        before = _health(url)["stats"]
        if stream:
            with httpx.stream("POST", url + "/completions", headers=_headers(), json=_long(True), timeout=30) as s:
                for line in s.iter_lines():
                    if line.startswith("data:") and '"text": ""' not in line:
                        break  # generating; now the client goes away
        else:
            with pytest.raises(httpx.TimeoutException):  # a client that gives up after 1 s
                httpx.post(url + "/completions", headers=_headers(), json=_long(), timeout=1.0)
        health = _settled(url, within=5.0)
        assert health["running"] == 0 and health["waiting"] == 0, (stream, health)  # the row is free
        generated = health["stats"]["tokens"] - before["tokens"]
        # stopped long before the end: ~150 tokens on the AVX2 CPU (7 ms a token), 536 on an AVX-512
        # one where the tiny model decodes ~3x faster (the client waits 1 s before it goes away)
        assert generated < BUSY_TOKENS // 2, (stream, generated)
        assert health["stats"]["cancelled"] == before["cancelled"] + 1
    _quiet_log(busy)


def test_full_queue_is_429(busy):
    url = busy["url"]
    waiting = {}

    def queued():  # waits behind the running request, then its client gives up
        try:
            httpx.post(url + "/completions", headers=_headers(), json=_long(), timeout=3.0)
        except httpx.TimeoutException as e:
            waiting["gave up"] = e

    with httpx.stream("POST", url + "/completions", headers=_headers(), json=_long(True), timeout=30) as s:
        lines = s.iter_lines()  # held: an iterator dropped half-way closes the connection
        next(line for line in lines if line.startswith("data:"))  # running: the one batch row
        t = threading.Thread(target=queued)
        t.start()
        deadline = time.time() + 10
        while _health(url)["waiting"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        r = httpx.post(url + "/completions", headers=_headers(), json=_long(), timeout=10)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "server_busy"
    t.join(30)
    assert "gave up" in waiting
    health = _settled(url, within=5.0)
    assert health["running"] == 0 and health["waiting"] == 0, health


def test_adapter_for_another_base_is_refused_when_loaded(busy):
    url = busy["url"]
    for stream in (False, True):
        r = httpx.post(url + "/completions", headers=_headers(), timeout=30,
                       json={"model": "foreign", "prompt": "hi", "max_tokens": 2, "stream": stream})
        assert r.status_code == 400, (stream, r.status_code, r.text)
        error = r.json()["error"]
        assert error["code"] == "invalid_model" and error["param"] == "model"
        assert "'foreign'" in error["message"] and "another base" in error["message"]
        assert str(busy["root"]) not in error["message"] and "/" not in error["message"], error["message"]
    ok = httpx.post(url + "/completions", headers=_headers(), timeout=60,
                    json={"model": "alpha", "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_api_key_from_a_file(busy):
    cmdline = open(f"/proc/{busy['proc'].pid}/cmdline", "rb").read()
    assert KEY.encode() not in cmdline
    r = httpx.get(busy["url"] + "/models", timeout=10)
    assert r.status_code == 401
    r = httpx.get(busy["url"] + "/models", headers=_headers(), timeout=10)
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["base", "alpha", "foreign"]


def test_api_key_sources_and_the_exposure_warning(tmp_path):
    from types import SimpleNamespace

    from peftlab.commands.serve import api_key, exposure_warning
    from peftlab.errors import ConfigError

    def args(key=None, path=None):
        return SimpleNamespace(api_key=key, api_key_file=path)

    (tmp_path / "k").write_text("  s3cret \n")
    (tmp_path / "empty").write_text("\n")
    assert api_key(args(path=str(tmp_path / "k")), {}) == "s3cret"
    assert api_key(args(), {"PEFTLAB_API_KEY": "env"}) == "env"
    assert api_key(args("flag"), {"PEFTLAB_API_KEY": "env"}) == "flag"
    assert api_key(args(), {}) is None
    with pytest.raises(ConfigError, match="empty"):
        api_key(args(path=str(tmp_path / "empty")), {})
    with pytest.raises(ConfigError, match="not both"):
        api_key(args("flag", str(tmp_path / "k")), {})
    with pytest.raises(ConfigError, match="missing"):
        api_key(args(path=str(tmp_path / "missing")), {})
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        assert "without an API key" in exposure_warning(host, None), host
        assert exposure_warning(host, "k") is None
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert exposure_warning(host, None) is None, host
    # the CLI prints it at start (the model fails to load here, so nothing ever listens)
    done = subprocess.run(cli("serve", "model.name=/nonexistent/base", "--host", "0.0.0.0", "--port", "0"),
                          env=cli_env(PEFTLAB_API_KEY=""), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "warning: listening on 0.0.0.0 without an API key" in done.stderr
