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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("srv")
    base = save_tiny_base("llama", root / "base")
    adapters = root / "adapters"
    for i, name in enumerate(("alpha", "beta", "gamma")):
        make_adapter(base, adapters / name, r=2 + i, targets="all-linear", seed=40 + i)
    make_adapter(base, root / "outside", r=2)
    os.symlink(root / "outside", adapters / "sneaky")
    errors = (root / "stderr.txt").open("w")  # a file, not a pipe nobody reads (a full pipe blocks the server)
    proc = subprocess.Popen(
        cli("serve", f"model.name={base}", "--adapters", str(adapters), "--port", "0", "--api-key", KEY,
            "--max-tokens", "24", "--max-context", "96", "--max-request-bytes", "20000", "--max-batch", "4",
            "--max-loaded", "2", "--threads", "1"),
        env=cli_env(), stdout=subprocess.PIPE, stderr=errors, text=True)
    line = proc.stdout.readline()  # blocks until the server prints where it listens (or dies)
    if "listening on" not in line:
        proc.kill()
        pytest.fail(f"server did not start: {line!r} {(root / 'stderr.txt').read_text()[-2000:]}")
    url = line.split("listening on ")[1].split()[0]
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(url.replace("/v1", "/health"), timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    yield {"url": url, "base": base, "adapters": adapters, "proc": proc}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    errors.close()


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


def test_completions_and_concurrent_mixed_adapters(server):
    client = _client(server)
    tok = tokenizer_for("llama")
    stream = client.completions.create(model="base", prompt="Once upon a time", max_tokens=8, temperature=0,
                                       stream=True)
    text = "".join(c.choices[0].text for c in stream)
    assert text == _reference(server, None, tok("Once upon a time", add_special_tokens=False).input_ids, 8)
    jobs = [("alpha", "The first"), ("beta", "A second prompt, longer"), ("gamma", "Third"), ("base", "Four"),
            ("alpha", "Fifth and last")]
    results = {}

    def call(i, model, prompt):
        results[i] = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)

    threads = [threading.Thread(target=call, args=(i, *j)) for i, j in enumerate(jobs)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    for i, (model, prompt) in enumerate(jobs):
        ids = tok(prompt, add_special_tokens=False).input_ids
        assert results[i].choices[0].text == _reference(server, None if model == "base" else model, ids, 12), model
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
