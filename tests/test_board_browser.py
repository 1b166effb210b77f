"""peftlab board in a real browser: Debian's chromium driven by Playwright (pointed at the
executable; nothing is downloaded), a real board server, real ``peftlab train`` subprocesses.

The form is filled and a tiny run launched, watched to "done" with its curve drawn; a second run
is launched from the form too; the two are compared (parameter table, overlaid curves, generated
side-by-side answers); one prompt goes to the base and both adapters and the streamed answers
are read; path escapes are tried in the form and in the address bar.

Marked slow (two trainings, model loads for the generations and the chat: about two minutes on
2 busy cores, over the default suite's budget); .ci/run runs them in a step of their own.
``PEFTLAB_BOARD_SHOTS=DIR`` saves a screenshot of each page there (docs/board-*.png).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from boardkit import TINY_RUN, board_server
from peftlab import registry
from peftlab.rundir import read_metrics, read_summary

pytestmark = pytest.mark.slow
CHROMIUM = os.environ.get("PEFTLAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = os.environ.get("PEFTLAB_BOARD_SHOTS")
STEPS = 6


def missing(what: str):
    """Skip where the browser cannot run; fail on CI (.ci/run sets PEFTLAB_REQUIRE_BROWSER=1)."""
    (pytest.fail if os.environ.get("PEFTLAB_REQUIRE_BROWSER") else pytest.skip)(what)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        missing("the browser tests need Debian's chromium: apt-get install -y chromium "
                "(Playwright drives it; never `playwright install`)")
    try:
        from playwright import sync_api
    except ImportError:
        missing("the browser tests need Playwright's Python package: pip install playwright (in the dev extra)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    (ws / "data").mkdir()
    (ws / "data" / "out").symlink_to(outside)
    with board_server(ws, poll_s=0.3) as (url, _):
        yield url, ws


@pytest.fixture
def page(browser):
    pg = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    pg.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page, name, element=None):
    """With PEFTLAB_BOARD_SHOTS: the page (the form from its top: it is long), or one element of it."""
    if not SHOTS:
        return
    Path(SHOTS).mkdir(parents=True, exist_ok=True)
    path = str(Path(SHOTS) / f"board-{name}.png")
    if element is not None:
        page.locator(element).screenshot(path=path)
    elif name == "new":
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=path)
    else:
        page.screenshot(path=path, full_page=True)


def fill_form(page, url, name, extra):
    page.goto(url + "/new")
    page.wait_for_selector("[id='f-train.lr']")
    page.fill("#name", name)
    for key, value in {**TINY_RUN, **extra}.items():
        field = page.locator(f"[id='f-{key}']")
        if field.evaluate("e => e.tagName") == "SELECT":
            field.select_option(value)
        else:
            field.fill(value)
    page.wait_for_function("document.body.dataset.valid === 'true' && "
                           f"document.getElementById('cli').textContent.includes('runs/{name}')")


def launch_and_watch(page, url, ws, name, extra):
    fill_form(page, url, name, extra)
    page.click("#launch")
    page.wait_for_url(f"**/run?id=runs%2F{name}")
    page.wait_for_selector("body[data-status='running'], body[data-status='done']", timeout=60_000)
    page.wait_for_selector("body[data-status='done']", timeout=240_000)
    summary = read_summary(ws / "runs" / name)
    assert summary is not None and summary["steps"] == STEPS
    # the curve: every logged step is a point of the train-loss line, the evals of the dashed one
    metrics = read_metrics(ws / "runs" / name)
    train = page.locator("svg.curve path[data-series='train loss']")
    assert train.get_attribute("data-points") == str(len([r for r in metrics if "loss" in r])) == str(STEPS)
    evals = [r for r in metrics if r.get("eval_loss") is not None]
    assert page.locator("svg.curve path[data-series='eval loss']").get_attribute("data-points") == str(len(evals))
    assert page.inner_text("#progress") == f"step {STEPS} of {STEPS}"
    assert f"{summary['trainable']:,}" == page.inner_text("#trainable")
    assert "peft:" in page.inner_text("#config") and "adapter/adapter_model.safetensors" in page.inner_text("#artifacts")


def test_form_launch_watch_done(board, page):
    url, ws = board
    fill_form(page, url, "r4", {"peft.r": "4", "train.steps": str(STEPS)})
    # the command and YAML shown for copy, the changed fields marked, method keys for the method
    assert page.inner_text("#cli").startswith("peftlab train ")
    assert "r: 4" in page.inner_text("#yaml")
    assert page.locator("[id='row-peft.r']").get_attribute("class") == "field changed"
    page.click("#previewbtn")
    page.wait_for_selector("#preview mark.trained", timeout=120_000)
    assert page.locator("#preview span.prompt").count() >= 1  # prompt tokens told apart from trained ones
    shot(page, "preview", "#preview")
    page.select_option("#method", "ia3")
    page.wait_for_selector("[id='row-peft.r']", state="detached")
    ia3 = {f.name for f in dataclasses.fields(registry.get("ia3").config_cls)} - {"method"}
    shown = {i.replace("f-peft.", "") for i in page.locator("#sec-peft [id^='f-peft.']").evaluate_all(
        "nodes => nodes.map(n => n.id)")}
    assert shown == ia3, (shown, ia3)  # IA3's own keys, LoRA's gone
    page.select_option("#method", "lora")
    page.wait_for_selector("[id='f-peft.r']")
    # train.lr left as it is follows the objective (GRPO: a fifth of LoRA's 5e-4); a typed one stays
    lr = page.locator("[id='f-train.lr']")
    assert lr.input_value() == "0.0005"
    page.select_option("[id='f-train.objective']", "grpo")
    assert lr.input_value() == "0.0001" and "default: 0.0001" in page.inner_text("[id='help-train.lr']")
    page.select_option("[id='f-train.objective']", "lm")
    assert lr.input_value() == "0.0005"
    lr.fill("0.002")
    page.select_option("[id='f-train.objective']", "grpo")
    assert lr.input_value() == "0.002"
    page.select_option("[id='f-train.objective']", "lm")
    lr.fill("0.0005")
    shot(page, "new")
    launch_and_watch(page, url, ws, "r4", {"peft.r": "4", "train.steps": str(STEPS)})
    shot(page, "run")


def test_a_second_run_then_compare(board, page):
    url, ws = board
    launch_and_watch(page, url, ws, "r8", {"peft.r": "8", "train.steps": str(STEPS), "train.lr": "0.001"})
    page.goto(url + "/")
    for rid in ("runs/r4", "runs/r8"):
        page.wait_for_selector(f"tr[data-run='{rid}'] td.s-done")
        page.check(f"tr[data-run='{rid}'] input[type=checkbox]")
    order = lambda: page.locator("tr[data-run]").evaluate_all("rows => rows.map(r => r.dataset.run)")  # noqa: E731
    page.click("th[data-key='trainable']")  # sortable: r4 (rank 4) has fewer trainable parameters
    assert order() == ["runs/r4", "runs/r8"]
    page.click("th[data-key='trainable']")
    assert order() == ["runs/r8", "runs/r4"]
    shot(page, "runs")
    page.click("#compare")
    page.wait_for_selector("#params table")
    rows = page.locator("#params tr").all_inner_texts()
    for rid in ("runs/r4", "runs/r8"):
        trainable = read_summary(ws / rid)["trainable"]
        assert any(rid in r and f"{trainable:,}" in r for r in rows), rows
    assert page.locator("#chart path[data-series]").count() == 4  # train + eval loss of each run, overlaid
    page.click("#generate")
    page.wait_for_selector("#generations .card", timeout=240_000)
    for rid in ("runs/r4", "runs/r8"):
        assert page.locator(f"#generations .card[data-run='{rid}']").count() == 4  # the report's four prompts
    shot(page, "compare")


def test_chat_streams_base_and_adapters(board, page):
    url, ws = board
    if not (ws / "runs" / "r8" / "adapter").is_dir():
        pytest.skip("needs the runs of the tests above")
    page.goto(url + "/chat?runs=runs/r4&runs=runs/r8")
    page.wait_for_selector("#picker input[value='runs/r4']:checked")
    page.fill("#prompt", "What is 12 plus 30?")
    page.fill("#maxtok", "12")
    page.click("#send")
    page.wait_for_selector("body[data-done='true']", timeout=240_000)
    for who in ("base", "r4", "r8"):
        box = page.locator(f"pre[data-who='{who}']")
        assert box.inner_text().strip(), who
        assert int(box.get_attribute("data-pieces")) > 1, f"{who}: the answer came in one piece, not streamed"
        assert page.inner_text(f"#fin-{who}").startswith("finished: ")
    shot(page, "chat")


def test_path_escapes_are_refused_in_the_browser(board, page):
    url, ws = board
    page.goto(url + "/new")
    page.wait_for_selector("[id='f-data.path']")
    page.fill("#name", "escape")
    for value, says in (("../secret.jsonl", "contains '..'"), ("data/out/secret.jsonl", "through a symlink"),
                        ("/etc/passwd", "is outside it")):
        page.fill("[id='f-data.path']", value)
        page.wait_for_function(f"document.getElementById('err-data.path').textContent.includes({says!r})")
        page.click("#launch")
        page.wait_for_function(f"document.getElementById('err-data.path').textContent.includes({says!r})")
    assert page.url.endswith("/new") and not (ws / "runs" / "escape").exists()
    page.fill("[id='f-data.path']", "")
    page.fill("#name", "../escape")
    page.wait_for_function("document.getElementById('err-name').textContent.includes('not a valid name')")
    page.goto(url + "/run?id=../../etc")
    page.wait_for_selector("#note.err")
    assert "not a valid name" in page.inner_text("#note")
