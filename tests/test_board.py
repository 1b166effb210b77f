"""peftlab board over real HTTP (a uvicorn server on a loopback port), without a browser: the
form against the config dataclasses and the CLI's validator, the workspace's path rules, the
token, and a real ``peftlab train`` subprocess launched, refused a second time, and stopped.
The browser tests are in test_board_browser.py."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex

import httpx
import pytest
import yaml

from boardkit import TINY_RUN, board_server, wait_for
from peftlab import registry
from peftlab.config import SECTIONS
from peftlab.configure import config_from_dict, load_config
from peftlab.errors import ConfigError


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    (ws / "data").mkdir()
    (ws / "data" / "link").symlink_to(outside)  # a symlink out of the workspace
    (ws / "runs").mkdir()
    (ws / "runs" / "escape").symlink_to(outside)  # a "run" that is a symlink out
    with board_server(ws) as (url, app):
        yield url, ws, outside, app


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=60, **kw)


def test_form_has_every_key_of_every_section_and_the_methods_own(board):
    url, *_ = board
    for method in ("lora", "dora", "ia3", "prefix_tuning"):
        schema = httpx.get(f"{url}/api/schema", params={"method": method}).json()
        got = {f["key"] for s in schema["sections"] for f in s["fields"]}
        classes = {**SECTIONS, "peft": registry.get(method).config_cls}
        want = {f"{s}.{f.name}" for s, cls in classes.items() for f in dataclasses.fields(cls)}
        assert got == want - {"train.output_dir", "train.overwrite"}, method  # the board places runs itself
        lr = next(f for s in schema["sections"] for f in s["fields"] if f["key"] == "train.lr")
        assert float(lr["default"]) == load_config(None, [f"peft.method={method}"]).train.lr, method  # the method's own
        for objective, text in lr["by_objective"].items():  # what the page shows as train.objective changes
            want = load_config(None, [f"peft.method={method}", f"train.objective={objective}"]).train.lr
            assert float(text) == pytest.approx(want), (method, objective)
        assert float(lr["by_objective"]["grpo"]) == pytest.approx(float(lr["default"]) / 5)
    lora = httpx.get(f"{url}/api/schema").json()["sections"]
    train = {f["key"]: f for f in lora[3]["fields"]}
    assert train["train.lr"]["default"] == "0.0005" and train["train.schedule"]["choices"][0] == "cosine"
    assert "optimiser steps" in train["train.steps"]["help"]  # the comment beside the field in config.py


@pytest.mark.parametrize("values", [{"train.lr": "-1"}, {"train.lr": "fast"}, {"peft.r": "0"},
                                    {"data.max_length": "8", "data.max_prompt_length": "16"},
                                    {"train.schedule": "sometimes"}, {"peft.method": "full", "peft.r": "8"}])
def test_form_errors_are_the_clis_own_beside_the_field(board, values):
    url, *_ = board
    res = post(url, "/api/check", {"values": values}).json()
    with pytest.raises(ConfigError) as cli:
        load_config(None, [f"{k}={v}" for k, v in values.items()])
    assert res["ok"] is False and res["error"] == str(cli.value)
    assert res["field"] in values, res


def test_a_valid_form_gives_the_command_and_yaml_that_reproduce_it(board):
    url, *_ = board
    res = post(url, "/api/check", {"values": {**TINY_RUN, "peft.r": "4"}, "name": "r4"}).json()
    assert res["ok"], res
    assert res["cli"].startswith("peftlab train ") and "train.output_dir=runs/r4" in res["cli"]
    from_cli = load_config(None, shlex.split(res["cli"])[2:]).to_dict()
    assert config_from_dict(yaml.safe_load(res["yaml"])).to_dict() == from_cli == res["config"]
    assert from_cli["peft"]["r"] == 4 and from_cli["train"]["output_dir"] == "runs/r4"


@pytest.mark.parametrize("key,value,says", [
    ("data.path", "../secret.jsonl", "contains '..'"),
    ("data.path", "ABS/secret.jsonl", "is outside it"),
    ("data.path", "data/link/secret.jsonl", "through a symlink"),
    ("data.eval_path", "data/link/secret.jsonl", "through a symlink"),
    ("model.name", "/etc", "is outside it"),
    ("peft.init_from", "data/../../x", "contains '..'"),
    ("data.train", "ok.jsonl,../x.jsonl", "contains '..'"),
    ("train.deepspeed", "ABS/ds.json", "is outside it"),
    ("grpo.rewards", "exact_match,ABS/reward.py:score", "is outside it"),
])
def test_paths_outside_the_workspace_are_refused_with_the_field(board, key, value, says):
    url, ws, outside, _ = board
    value = value.replace("ABS", str(outside))
    for path in ("/api/check", "/api/preview"):
        res = post(url, path, {"values": {key: value}}).json()
        assert res["ok"] is False and res["field"] == key and says in res["error"], res
    r = post(url, "/api/launch", {"name": "escape-try", "values": {key: value}})
    assert r.status_code == 400 and r.json()["field"] == key and says in r.json()["error"]
    assert not (ws / "runs" / "escape-try").exists() and not (ws / ".board" / "runs+escape-try.json").exists()


@pytest.mark.parametrize("run_id", ["../outside", "/etc", "runs/escape", "runs/..", "runs/nope", "a//b"])
def test_run_ids_cannot_leave_the_workspace(board, run_id):
    url, *_ = board
    for path in ("/api/run", "/api/run/events"):
        r = httpx.get(url + path, params={"id": run_id})
        assert r.status_code == 400 and r.json()["error"], (path, r.text)
    r = httpx.get(url + "/api/compare", params={"runs": [run_id, "runs/nope"]})
    assert r.status_code == 400
    r = post(url, "/api/chat", {"prompt": "hi", "runs": [run_id]})
    assert r.status_code == 400 and r.json()["field"] == "runs"
    assert run_id not in [row["id"] for row in httpx.get(url + "/api/runs").json()["runs"]]


def test_run_names_with_paths_are_refused(board):
    url, *_ = board
    for name in ("../x", "a/b", "/tmp/x", ".hidden", ""):
        r = post(url, "/api/launch", {"name": name, "values": TINY_RUN})
        assert r.status_code == 400 and r.json()["field"] == "name", (name, r.text)
    assert httpx.get(url + "/static/..%2Fapp.py").status_code == 404


def test_requests_from_other_sites_are_refused(board):
    url, *_ = board
    assert httpx.get(url + "/api/runs", headers={"Host": "attacker.example"}).status_code == 403
    r = httpx.post(url + "/api/launch", content="name=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415


def test_token_is_required_when_set(tmp_path):
    with board_server(tmp_path, token="s3cret") as (url, _):
        assert httpx.get(url + "/api/runs").status_code == 401
        assert httpx.get(url + "/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url + "/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        with httpx.Client(follow_redirects=True) as c:  # the printed address sets a cookie, then pages work
            r = c.get(url + "/?token=s3cret")
            assert r.status_code == 200 and "peftlab board" in r.text
            assert c.get(url + "/api/runs").status_code == 200


def test_listening_beyond_loopback_needs_a_token(tmp_path, monkeypatch):
    from peftlab.commands import board as cmd

    monkeypatch.delenv("PEFTLAB_BOARD_TOKEN", raising=False)
    args = argparse.Namespace(workspace=str(tmp_path), host="0.0.0.0", port=0, token_file=None, parallel=1)
    with pytest.raises(ConfigError, match="PEFTLAB_BOARD_TOKEN"):
        cmd.run(args)
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        cmd.board_token(argparse.Namespace(token_file=str(empty)))


def test_launch_refuses_a_second_run_and_stop_ends_it_cleanly(board):
    url, ws, *_ = board
    # 20 epochs: thousands of steps, so an idle machine cannot finish it before the stop
    r = post(url, "/api/launch", {"name": "long", "values": {**TINY_RUN, "train.epochs": "20"}})
    assert r.status_code == 200, r.text
    assert r.json()["run"] == "runs/long"

    def row(run_id):
        return next((x for x in httpx.get(url + "/api/runs").json()["runs"] if x["id"] == run_id), None)

    assert row("runs/long")["status"] == "running"
    wait_for(lambda: (ws / "runs" / "long" / "metrics.jsonl").is_file() and
             (ws / "runs" / "long" / "metrics.jsonl").read_text().count("\n") >= 1, 120, "the first step")
    # a run by epochs: its length comes from train's announcement in the log (train examples // batch)
    log = httpx.get(url + "/api/run", params={"id": "runs/long"}).json()["log"]
    n_train = int(re.search(r"^data: \d+ records, (\d+) train", log, re.M).group(1))
    assert row("runs/long")["target_steps"] == 20 * (n_train // 4)
    second = post(url, "/api/launch", {"name": "second", "values": TINY_RUN})
    assert second.status_code == 400 and "runs/long is still running" in second.json()["error"]
    stopped = post(url, "/api/stop", {"run": "runs/long"}).json()
    assert stopped["stopped"] is True and stopped["returncode"] == 130  # the CLI's KeyboardInterrupt path
    assert row("runs/long")["status"] == "killed"
    assert "peftlab train: interrupted" in httpx.get(url + "/api/run", params={"id": "runs/long"}).json()["log"]
    assert not (ws / "runs" / "long" / "summary.json").exists()
    record = json.loads((ws / ".board" / "runs+long.json").read_text())
    assert record["command"][:2] == ["peftlab", "train"] and "train.output_dir=runs/long" in record["command"]
    with pytest.raises(ProcessLookupError):
        os.kill(record["pid"], 0)
    assert post(url, "/api/stop", {"run": "runs/long"}).status_code == 400  # nothing left to stop


def test_a_run_that_fails_says_so_with_its_log(board):
    """A config the form accepts but training refuses (a model directory with only pickled weights:
    found by train's pre-flight checks, as on the command line) ends as "failed", with the CLI's
    error in the log."""
    url, ws, *_ = board
    (ws / "pickled").mkdir()
    (ws / "pickled" / "pytorch_model.bin").write_bytes(b"not unpickled")
    r = post(url, "/api/launch", {"name": "pickled", "values": {"model.name": "pickled"}})
    assert r.status_code == 200, r.text

    def status():
        rows = httpx.get(url + "/api/runs").json()["runs"]
        return next(x for x in rows if x["id"] == "runs/pickled")["status"]

    wait_for(lambda: status() != "running", 120, "the run to end")
    assert status() == "failed"
    state = httpx.get(url + "/api/run", params={"id": "runs/pickled"}).json()
    assert state["row"]["note"] == "exit status 2"
    assert "peftlab train: error: model.name 'pickled' has weights only as pickle files" in state["log"]


def test_the_command_serves_the_workspace_and_stops_on_ctrl_c(tmp_path):
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "peftlab", "board", "--workspace", str(tmp_path), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"open (http://127\.0\.0\.1:\d+/)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        data = httpx.get(m.group(1) + "api/runs", timeout=30).json()
        assert data["workspace"] == str(tmp_path.resolve()) and data["runs"] == []
        assert "peftlab board" in httpx.get(m.group(1), timeout=30).text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    assert "peftlab board: stopped" in proc.stderr.read()


def test_launch_records_map_back_to_their_runs(tmp_path):
    """A launched run is listed from its record before train writes config.yaml; names with
    underscores (allowed) map back to themselves."""
    from peftlab.board.workspace import Workspace

    ws = Workspace(tmp_path)
    for rid in ("runs/a__b", "runs/a_b", "runs/a.b"):
        ws.record_path(rid, ".json").write_text("{}")
    assert ws.find() == (["runs/a.b", "runs/a__b", "runs/a_b"], [])
    assert ws.run_dir("runs/a__b") == tmp_path.resolve() / "runs" / "a__b"
