"""The transplant Space: its logic module on tiny models, and the app driven over HTTP with gradio_client."""

import json
import os
import shutil
import socket
import sys
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import warm_python
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer
from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM

import not_hub

SPACE = Path(__file__).parents[1] / "spaces" / "not-hub-transplant"
sys.path.insert(0, str(SPACE))
import engine  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("space")
    recipient = tiny_model("llama")
    recipient.save_pretrained(root / "recipient")
    tiny_tokenizer().save_pretrained(root / "recipient")
    not_hub.extract_organ(recipient, layer_range=(2, 4)).save_pretrained(root / "organ")
    not_hub.extract_organ(tiny_model("llama", seed=5), layer_range=(1, 3)).save_pretrained(root / "foreign-organ")
    not_hub.extract_organ(tiny_model("qwen2"), layer_range=(1, 3)).save_pretrained(root / "qwen2-organ")
    bert = BertForMaskedLM(
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=128)
    )
    bert.save_pretrained(root / "bert")
    tiny_tokenizer().save_pretrained(root / "bert")
    return root


# ----------------------------------------------------------------------------------------------------- engine


@pytest.fixture(autouse=True)
def offered_folders(assets, monkeypatch):
    """The test assets are folders this server offers (as an operator would list them in NOT_HUB_SPACE_FOLDERS)."""
    monkeypatch.setattr(engine, "SERVER_FOLDERS", [*engine.SERVER_FOLDERS, assets.resolve()])


def test_metadata_and_compatibility(assets):
    meta = engine.organ_metadata(str(assets / "organ"))
    assert meta["donor layers"] == "layers 2 to 3 of 6 (numbered from 0)" and meta["trained"] == "no"
    rows, ok = engine.compatibility(str(assets / "organ"), str(assets / "recipient"))
    assert ok and {r[0] for r in rows} >= {"hidden_size", "num_attention_heads", "decoder_layer_class"}
    rows, ok = engine.compatibility(str(assets / "qwen2-organ"), str(assets / "recipient"))
    assert not ok and ["decoder_layer_class"] == [
        r[0] for r in rows if r[3] == "BLOCKS" and r[0] == "decoder_layer_class"
    ]
    assert engine.position_range(str(assets / "organ"), str(assets / "recipient"), "replace") == (0, 4)
    assert engine.position_range(str(assets / "organ"), str(assets / "recipient"), "insert") == (0, 6)


def test_identity_transplant_changes_nothing_and_working_copy_is_restored(assets, hash_state):
    recipient, organ = str(assets / "recipient"), str(assets / "organ")
    loaded = engine.CACHE.recipient(recipient)
    before = hash_state(loaded.working)
    report = engine.transplant_and_measure(recipient, organ, "replace", 2)
    assert report.domain_after == pytest.approx(report.domain_before, rel=1e-6)
    other = engine.transplant_and_measure(recipient, str(assets / "foreign-organ"), "insert", 0)
    assert other.depth_after == 8 and other.domain_after != pytest.approx(other.domain_before, rel=1e-3)
    assert hash_state(loaded.working) == before
    steps = list(engine.stream_side_by_side(recipient, organ, "replace", 2, "int f(", max_new_tokens=5))
    assert len(steps) == 5 and steps[-1][0] == steps[-1][1]  # identity organ: same text
    assert hash_state(loaded.working) == before


def test_sweep_reports_every_position_with_progress(assets):
    seen = []
    result = engine.sweep(
        str(assets / "recipient"), str(assets / "organ"), "replace", progress=lambda f, d: seen.append(f)
    )
    assert [r["position"] for r in result["rows"]] == [0, 1, 2, 3, 4]
    assert seen[-1] == 1.0 and len(seen) == 5
    assert result["rows"][2]["perplexity"] == pytest.approx(result["baseline"], rel=1e-6)


def test_export_gives_a_plain_transformers_folder(assets, tmp_path):
    path = engine.export_folder(str(assets / "recipient"), str(assets / "foreign-organ"), "insert", 1)
    zipfile.ZipFile(path).extractall(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.num_hidden_layers == 8 and model.config.transplants[0]["position"] == 1
    # the organ is named, not located: no path of this server in anything a visitor downloads
    assert model.config.transplants[0]["organ"] == "foreign-organ"
    assert str(assets) not in (tmp_path / "config.json").read_text()


def test_a_stream_stops_before_its_next_token_when_asked(assets):
    recipient, organ = str(assets / "recipient"), str(assets / "organ")
    stream = engine.STREAMS.start("visitor")
    steps = engine.stream_side_by_side(recipient, organ, "replace", 2, "int f(", max_new_tokens=8, stop=stream.stop)
    first = next(steps)
    waiter = threading.Thread(target=engine.STREAMS.stop, args=("visitor",))
    waiter.start()  # Explant: asks the stream to stop and waits for it
    time.sleep(0.2)
    assert waiter.is_alive()  # still waiting: the stream has not ended yet
    with pytest.raises(StopIteration):
        next(steps)  # no further token
    engine.STREAMS.finish(stream)
    waiter.join(timeout=5)
    assert not waiter.is_alive() and first[1]
    assert engine.STREAMS.stop("visitor") is False  # nothing left running for that session
    text, url = engine.organ_card(organ)
    assert url is None and text and not text.startswith("---")  # a local organ: its card, no Hub link


def test_bad_inputs_give_clear_errors(assets):
    recipient, organ = str(assets / "recipient"), str(assets / "organ")
    with pytest.raises(not_hub.errors.ModelLoadError, match="could not load recipient 'nobody/nothing'"):
        engine.CACHE.recipient("nobody/nothing")
    with pytest.raises(not_hub.errors.UnsupportedArchitectureError, match="encoder-only"):
        engine.CACHE.recipient(str(assets / "bert"))
    with pytest.raises(not_hub.errors.IncompatibleOrganError, match="decoder_layer_class"):
        engine.transplant_and_measure(recipient, str(assets / "qwen2-organ"), "replace", 0)
    with pytest.raises(not_hub.errors.InvalidPositionError, match="expected 0 <= position <= 4"):
        engine.transplant_and_measure(recipient, organ, "replace", 9)
    with pytest.raises(not_hub.errors.InvalidArgumentError, match="prompt is empty"):
        next(engine.stream_side_by_side(recipient, organ, "replace", 0, "   "))
    with pytest.raises(not_hub.errors.InvalidArgumentError, match="your own Hub token"):
        engine.push(recipient, organ, "replace", 0, "me/x", "")
    with pytest.raises(not_hub.errors.HubConnectionError, match="offline"):
        engine.push(recipient, organ, "replace", 0, "me/x", "hf_visitor")


PUSH_AS_VISITOR = """
import sys
sys.path.insert(0, {space!r})
import engine, not_hub
try:
    engine.push({recipient!r}, {organ!r}, "replace", 0, "me/pushed", "")
except not_hub.errors.InvalidArgumentError as err:
    print("REFUSED:", err)
print(engine.push({recipient!r}, {organ!r}, "replace", 0, "me/pushed", "hf_visitor"))
"""


def test_a_visitor_pushes_only_with_the_token_they_typed(assets, tmp_path):
    """A Space that pushes has its owner's HF_TOKEN in its environment; a blank token field must not use it."""
    from hub_server import LocalHub

    hub = LocalHub().start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(
            HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf"), HF_TOKEN="hf_owner", HF_HUB_DISABLE_TELEMETRY="1"
        )
        env["NOT_HUB_SPACE_FOLDERS"] = str(assets)
        script = PUSH_AS_VISITOR.format(
            space=str(SPACE), recipient=str(assets / "recipient"), organ=str(assets / "organ")
        )
        out = warm_python.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "REFUSED: pushing needs your own Hub token" in out.stdout
        assert "me/pushed" in hub.state.repos  # the typed token pushed
        seen = set(hub.state.authorization)
        assert "Bearer hf_visitor" in seen and not any("hf_owner" in (a or "") for a in seen)
    finally:
        hub.stop()


def test_cache_is_bounded(assets):
    cache = engine.ModelCache(max_models=1)
    a = cache.recipient(str(assets / "recipient"))
    assert cache.recipient(str(assets / "recipient")) is a
    cache.recipient(str(assets / "recipient") + "/")  # another key: evicts the first
    assert len(cache._models) == 1


# ------------------------------------------------------------------------------------------- app over HTTP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _app_env(assets, port: int, **extra: str) -> dict[str, str]:
    """The Space's environment for a test server on `port`, offering the test assets."""
    return {
        **os.environ,
        "NOT_HUB_SPACE_RECIPIENT": str(assets / "recipient"),
        "NOT_HUB_SPACE_ORGAN": str(assets / "organ"),
        "NOT_HUB_SPACE_FOLDERS": str(assets),
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


def _wait_for_app(proc, port: int, timeout: float = 120) -> None:
    """Until the app accepts connections on `port` (its stderr shown if it died first)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.5)


@pytest.fixture(scope="module")
def app_url(assets):
    port = _free_port()
    # a stream of 24 tokens lasts ~4 s: long enough to explant during it
    env = _app_env(assets, port, NOT_HUB_SPACE_TOKEN_DELAY="0.15")
    proc = warm_python.start([sys.executable, str(SPACE / "app.py")], env=env)
    url = f"http://127.0.0.1:{port}/"
    _wait_for_app(proc, port)
    time.sleep(1.0)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def test_app_check_transplant_sweep_explant(client, assets, tmp_path):
    recipient, organ = str(assets / "recipient"), str(assets / "foreign-organ")
    meta, compat, _slider, status, card = client.predict(recipient, organ, "replace", api_name="/check")
    assert "Compatible" in status and "layers 1 to 2 of 6" in meta and "<table id='compat'>" in compat
    assert "| card | shown under *Organ card* below |" in meta and card and not card.startswith("---")  # no YAML
    stack, ppl, before, after, status = client.predict(recipient, organ, "insert", 3, "int f(", api_name="/transplant")
    assert "insert at 3" in status and "domain (code)" in ppl and before and after
    archive, status = client.predict(api_name="/download")  # through gradio_client, as a visitor's browser would
    zipfile.ZipFile(archive).extractall(tmp_path / "download")
    config_text = (tmp_path / "download" / "config.json").read_text()
    assert str(assets) not in config_text and str(Path.home()) not in config_text  # no server path leaves
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "download").config.num_hidden_layers == 8
    sweep_plot, summary = client.predict(recipient, organ, "replace", api_name="/sweep")
    assert summary.startswith("Best: position ") and "x the untouched model" in summary
    assert "5 positions, mode replace, on the code sample" in summary
    _stack, ppl, before, after, status = client.predict(api_name="/explant")  # the session remembers it
    assert status.startswith("Explanted") and "every request explants" in status.lower()
    assert (ppl, before, after) == ("", "", "")  # the transplant's results are cleared: the untouched state
    *_, status = client.predict(api_name="/explant")
    assert status.startswith("Nothing to explant")


def test_app_bad_inputs_keep_serving(client, assets):
    from gradio_client.exceptions import AppError

    recipient, organ = str(assets / "recipient"), str(assets / "organ")
    client.predict(recipient, organ, "insert", api_name="/check")  # the slider now allows 0..6 (insert)
    cases = [
        ((recipient, str(assets / "qwen2-organ"), "replace", 0, "x"), "decoder_layer_class"),
        (("nobody/nothing", organ, "replace", 0, "x"), "could not load recipient"),
        ((str(assets / "bert"), organ, "replace", 0, "x"), "encoder-only"),
        ((recipient, organ, "replace", 6, "x"), "expected 0 <= position <= 4"),
        ((recipient, organ, "replace", 0, ""), "prompt is empty"),
    ]
    for args, expected in cases:
        outputs = client.predict(*args, api_name="/transplant")
        assert expected in outputs[4], (args, outputs[4])
    with pytest.raises(AppError, match="greater than maximum"):  # beyond the slider: refused by gradio itself
        client.predict(recipient, organ, "replace", 11, "x", api_name="/transplant")
    _meta, _compat, _slider, status, _card = client.predict(recipient, organ, "replace", api_name="/check")
    assert "Compatible" in status  # still serving


def test_a_streamed_transplant_sends_the_figure_before_and_after_the_stream_not_per_token(assets):
    """Gradio renders a figure output to a PNG on every update that carries it: the 24 per-token updates carry only
    the two texts, and the last update carries the whole result again (figure, table, texts, status)."""
    import app

    recipient, organ = str(assets / "recipient"), str(assets / "foreign-organ")
    stream = engine.STREAMS.start("figure-test")
    try:
        updates = list(app._transplant(recipient, organ, "insert", 3, "int f(", stream))
    finally:
        engine.STREAMS.finish(stream)
    skipped = app.gr.skip()
    with_figure = [i for i, u in enumerate(updates) if u[0] is not None and u[0] != skipped]
    assert with_figure == [0, len(updates) - 1] and len(updates) > 3
    for update in updates[1:-1]:
        assert [v == skipped for v in update] == [True, True, False, False, True, True]
    first, last = updates[0], updates[-1]
    assert last[0] is first[0] and last[1] == first[1] and last[4] == first[4] and last[5] == first[5]
    assert (last[2], last[3]) == updates[-2][2:4] and last[3]  # the streamed texts, whole, with the result


def test_eight_concurrent_sessions_get_their_own_results(app_url, assets):
    from gradio_client import Client

    recipient, organ = str(assets / "recipient"), str(assets / "foreign-organ")
    expected = {p: engine.transplant_and_measure(recipient, organ, "insert", p).domain_after for p in range(7)}
    expected[7] = expected[0]
    results, errors = {}, []

    def session(i: int) -> None:
        try:
            position = i % 7
            out = Client(app_url, verbose=False).predict(
                recipient, organ, "insert", position, "int f(", api_name="/transplant"
            )
            results[i] = (position, out)
        except Exception as err:  # collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 8
    for position, out in results.values():
        assert f"insert at {position}" in out[4]
        row = next(line for line in out[1].splitlines() if line.startswith("| domain"))
        assert float(row.split("|")[3]) == pytest.approx(expected[position], abs=0.01)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _need_chromium() -> None:
    if _chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium (Debian's, driven by Playwright) for the module's browser tests; each test opens its
    own context (`new_page`), with its own cookies, storage and session, and closes it."""
    _need_chromium()
    from playwright.sync_api import sync_playwright
    from screenshot import ARGS as BROWSER_ARGS

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=BROWSER_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def new_page(browser, app_url):
    """`new_page(viewport)`: the app in a fresh browser context, once its first compatibility check is shown; the
    context is closed after the test."""
    contexts = []

    def open_page(viewport: dict):
        contexts.append(browser.new_context(viewport=viewport))
        page = contexts[-1].new_page()
        page.goto(app_url)
        page.wait_for_function("document.querySelector('#status')?.innerText.includes('Compatible')", timeout=60_000)
        return page

    yield open_page
    for context in contexts:
        context.close()


def test_browser_clicks_through_a_transplant(assets, tmp_path, new_page):
    """Headless Chromium (Debian's, driven by Playwright) loads the page, transplants and reads the results."""
    page = new_page({"width": 1400, "height": 1500})
    page.click("#compat-details button, #compat-details .label-wrap")  # the details are folded away
    page.wait_for_selector("#compat-table table", timeout=60_000)
    assert "decoder_layer_class" in page.inner_text("#compat-table")
    page.click("#transplant")
    # status and errors appear next to the button that caused them
    page.wait_for_function("document.querySelector('#run-status').innerText.includes('Transplanted')", timeout=60_000)
    page.wait_for_function("document.querySelector('#after textarea').value.length > 0", timeout=60_000)
    assert "domain (code)" in page.inner_text("#perplexity")
    # Explant during the stream: the stream stops and the page shows the untouched state, and stays so.
    page.click("#explant")
    page.wait_for_function("document.querySelector('#run-status').innerText.includes('Explanted')", timeout=30_000)
    assert "generation was stopped" in page.inner_text("#run-status")
    page.wait_for_function("document.querySelector('#after textarea').value === ''", timeout=10_000)
    time.sleep(1.5)  # longer than a few tokens: a stream still running would have written again
    assert page.input_value("#after textarea") == "" and page.input_value("#before textarea") == ""
    assert "Explanted" in page.inner_text("#run-status")
    assert "domain (code)" not in page.inner_text("#perplexity")  # the untouched state is shown
    # an incompatible organ: red BLOCKS rows and an "Incompatible" status; the page stays usable
    page.fill("#organ-input textarea", str(assets / "qwen2-organ"))
    page.click("#check")
    page.wait_for_function("document.querySelector('#status').innerText.includes('Incompatible')", timeout=60_000)
    assert "BLOCKS" in page.inner_text("#compat-table")
    page.click("#transplant")  # an error next to the button, and no stale result
    page.wait_for_function("document.querySelector('#run-status').innerText.includes('Error')", timeout=60_000)
    assert "domain (code)" not in page.inner_text("#perplexity")
    page.fill("#organ-input textarea", str(assets / "organ"))
    page.click("#check")
    page.wait_for_function("document.querySelector('#status').innerText.includes('Compatible:')", timeout=60_000)
    page.screenshot(path=str(tmp_path / "space.png"), full_page=True)
    assert (tmp_path / "space.png").stat().st_size > 10_000


def test_the_action_is_on_the_first_screen_and_a_phone_clips_nothing(tmp_path, new_page):
    """1280x900: the verdict and Transplant are visible without scrolling. 390x844 (a phone): no table cell is cut
    off, the compatibility verdict is on screen, and Transplant is within the first two screens."""
    page = new_page({"width": 1280, "height": 900})
    box = page.locator("#transplant").bounding_box()
    assert box["y"] + box["height"] <= 900, box  # no scrolling to reach the action
    assert page.locator("#status").bounding_box()["y"] < 900
    page.screenshot(path=str(tmp_path / "desktop.png"))

    page = new_page({"width": 390, "height": 844})
    status = page.locator("#status").bounding_box()
    assert status["x"] >= 0 and status["x"] + status["width"] <= 390
    assert page.locator("#transplant").bounding_box()["y"] < 2 * 844
    page.click("#compat-details button, #compat-details .label-wrap")
    page.wait_for_selector("#compat-table table", timeout=30_000)
    clipped = page.evaluate(
        """() => {
            const box = document.querySelector('#compat-table').getBoundingClientRect();
            return [...document.querySelectorAll('#compat-table td')]
                .map(td => td.getBoundingClientRect())
                .filter(r => r.right > Math.min(box.right, window.innerWidth) + 1 || r.left < box.left - 1)
                .length;
        }"""
    )
    assert clipped == 0
    words = page.evaluate(  # no word broken letter by letter: every cell at least a few characters wide
        "Math.min(...[...document.querySelectorAll('#compat-table td')].map(td => td.getBoundingClientRect().width))"
    )
    assert words > 40
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)


def _check_fields(page, recipient: str, organ: str) -> None:
    page.fill("#recipient-input textarea", recipient)
    page.fill("#organ-input textarea", organ)
    page.click("#compat-details button, #compat-details .label-wrap")
    page.click("#check")
    name = Path(organ).name  # the organ's table names it once the check has answered (the status line was already
    page.wait_for_function(  # "Compatible" for the page's own organ)
        f"document.querySelector('#organ-meta').innerText.includes({name!r})", timeout=60_000
    )
    page.wait_for_function("document.querySelector('#status').innerText.includes('Compatible:')", timeout=60_000)


def test_browser_the_transplanted_side_stops_at_its_end_of_text(assets, new_page):
    """Item 1: a recipient whose end-of-text token is the transplanted model's first token. The transplanted side
    shows only the end-of-text marker, and nothing is forced after it while the untouched side goes on."""
    recipient, organ, prompt = str(assets / "recipient"), str(assets / "foreign-organ"), "int f("
    position = engine.default_position(organ, recipient, "replace")
    loaded = engine.CACHE.recipient(recipient)
    ids = engine.check_prompt_fits(prompt, loaded.tokenizer, loaded.model, engine.MAX_NEW_TOKENS)
    organ_model = engine.CACHE.organ(organ)
    with torch.no_grad(), organ_model.transplanted(loaded.working, position=position, mode="replace"):
        first = int(loaded.working(ids).logits[0, -1].argmax())
    eos_recipient = assets / "eos-recipient"
    if not eos_recipient.exists():
        shutil.copytree(recipient, eos_recipient)
        config = json.loads((eos_recipient / "generation_config.json").read_text())
        (eos_recipient / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": first}))
    page = new_page({"width": 1280, "height": 900})
    _check_fields(page, str(eos_recipient), organ)
    page.wait_for_function(
        f"document.querySelector('#position input[type=number]').value === '{position}'", timeout=30_000
    )
    page.fill("#prompt textarea", prompt)
    page.click("#transplant")
    page.wait_for_function("document.querySelector('#after textarea').value.includes('[end of text]')", timeout=60_000)
    # the untouched side keeps writing (24 tokens at 0.15 s, or until its own end of text)
    page.wait_for_function("document.querySelector('#before textarea').value.length > 0", timeout=30_000)
    time.sleep(4.5)
    assert page.input_value("#after textarea") == engine.END_OF_TEXT
    assert page.input_value("#before textarea") != engine.END_OF_TEXT
    assert "greedy" in page.inner_text("#decoding-note")


def test_browser_a_bad_prompt_is_refused_before_any_transplant(assets, new_page):
    """Item 6: after a good transplant, an empty prompt gives an error at once and clears the earlier results
    (no perplexity table from another request sits beside it)."""
    page = new_page({"width": 1280, "height": 900})
    page.click("#transplant")
    page.wait_for_function("document.querySelector('#perplexity').innerText.includes('domain (code)')", timeout=60_000)
    page.click("#explant")
    page.wait_for_function("document.querySelector('#run-status').innerText.includes('Explanted')", timeout=30_000)
    page.fill("#prompt textarea", "   ")
    page.click("#transplant")
    page.wait_for_function("document.querySelector('#run-status').innerText.includes('Error')", timeout=30_000)
    assert "prompt is empty" in page.inner_text("#run-status")
    assert "domain (code)" not in page.inner_text("#perplexity")
    assert "Transplanted" not in page.inner_text("#run-status")


def test_browser_enter_examples_whole_positions_and_no_time_estimate(app_url, assets, new_page):
    """Item 9: Enter in the prompt transplants; the examples name the organ; a typed position of 3.7 is refused with
    the reason, not run as another layer than the page shows; no estimated duration is shown for a transplant."""
    page = new_page({"width": 1280, "height": 900})
    assert engine.DEFAULT_ORGAN_REPO_ID in page.inner_text("body")  # the examples' Organ column is filled
    page.fill("#prompt textarea", "int f(")
    page.press("#prompt textarea", "Enter")
    page.wait_for_function("document.querySelector('#run-status').innerText.includes('Transplanted')", timeout=60_000)
    # No estimated duration for a transplant: Gradio's estimate is the mean of earlier requests, which last as
    # long as their stream, so it overstated the wait for the numbers. The page asks for an elapsed-time counter.
    config = json.loads(urllib.request.urlopen(app_url + "config", timeout=30).read())
    ids = {c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") in ("transplant", "prompt")}
    transplants = [d for d in config["dependencies"] if any(t[0] in ids for t in d["targets"])]
    assert len(transplants) == 2 and all(d["show_progress"] == "minimal" for d in transplants), transplants
    page.click("#explant")
    page.wait_for_function("document.querySelector('#run-status').innerText.includes('Explanted')", timeout=30_000)
    box = page.locator("#position input[type=number]")
    box.fill("3.7")
    box.press("Tab")
    page.click("#transplant")
    page.wait_for_function(
        "['Transplanted', 'Error'].some(w => document.querySelector('#run-status').innerText.includes(w))",
        timeout=60_000,
    )
    # The box keeps 3.7 (the slider's thumb sits at 4): the run is refused and says why, instead of running
    # layer 3 while the page shows 3.7 and 4.
    status = page.inner_text("#run-status")
    assert "whole number" in status and "3.7" in status, status
    assert "domain (code)" not in page.inner_text("#perplexity")


def test_app_incompatible_organ_shows_blocking_rows_and_stays_usable(client, assets):
    recipient = str(assets / "recipient")
    meta, compat, _slider, status, _card = client.predict(
        recipient, str(assets / "qwen2-organ"), "replace", api_name="/check"
    )
    assert "Incompatible" in status and "BLOCKS" in compat and "decoder_layer_class" in compat
    assert "| property | value |" in meta  # a named header row, not an empty one
    meta, compat, _slider, status, _card = client.predict(
        recipient, str(assets / "organ"), "replace", api_name="/check"
    )
    assert status.startswith("Compatible") and "BLOCKS" not in compat


def test_the_engine_refuses_odd_fields_and_server_paths_it_does_not_offer(assets, tmp_path):
    organ = str(assets / "organ")
    for value in (5, ["user/organ"], {"path": organ}):
        with pytest.raises(not_hub.errors.InvalidArgumentError, match="must be given as text"):
            engine.organ_metadata(value)
        with pytest.raises(not_hub.errors.InvalidArgumentError, match="must be given as text"):
            engine.compatibility(organ, value)
    # A real organ folder elsewhere on this server is answered exactly like a path that does not exist.
    elsewhere = tmp_path / "private-organ"
    not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3)).save_pretrained(elsewhere)
    answers = {}
    for path in (str(elsewhere), str(tmp_path / "missing"), str(assets / ".." / elsewhere.parent.name / "x")):
        with pytest.raises(not_hub.errors.OrganNotFoundError) as err:
            engine.organ_metadata(path)
        answers[path] = str(err.value).replace(path[:120], "PATH")
    assert len(set(answers.values())) == 1, answers
    recipients = {}
    for path in ("/etc", "/no/such/folder", str(elsewhere)):
        with pytest.raises(not_hub.errors.ModelLoadError) as err:
            engine.compatibility(organ, path)
        recipients[path] = str(err.value).replace(path, "PATH")
    assert len(set(recipients.values())) == 1 and "huggingface.co" not in next(iter(recipients.values()))


def test_the_engine_refuses_positions_that_are_not_whole_or_all_out_of_range(assets):
    recipient, organ = str(assets / "recipient"), str(assets / "foreign-organ")
    with pytest.raises(not_hub.errors.InvalidPositionError, match="none of the positions"):
        engine.sweep(recipient, organ, "replace", positions=[40, 50])
    for position, words in (
        (2.7, "not a whole number"),
        (True, "not a layer position"),
        ("2", "not a layer position"),
    ):
        with pytest.raises(not_hub.errors.InvalidPositionError, match=words):
            engine.export_folder(recipient, organ, "insert", position)
    assert engine._position(3.0) == 3 and engine._position(np.int64(2)) == 2


def test_each_side_of_the_stream_stops_at_its_own_end_of_text(assets, monkeypatch):
    recipient, organ = str(assets / "recipient"), str(assets / "foreign-organ")
    *_, (_, free) = engine.stream_side_by_side(recipient, organ, "replace", 2, "int f(", max_new_tokens=6)
    loaded = engine.CACHE.recipient(recipient)
    first = loaded.tokenizer("int f(" + free, add_special_tokens=False)["input_ids"][len("int f(")]
    # The transplanted side's first token becomes the end-of-text token: that side ends there and says so.
    monkeypatch.setattr(loaded.model.generation_config, "eos_token_id", first)
    steps = list(engine.stream_side_by_side(recipient, organ, "replace", 2, "int f(", max_new_tokens=6))
    untouched, transplanted = steps[-1]
    assert transplanted == engine.END_OF_TEXT  # nothing forced after it
    assert all(after == engine.END_OF_TEXT for _, after in steps)
    assert untouched.endswith(engine.END_OF_TEXT) or len(steps) == 6  # the other side goes on to its own end
    assert "greedy" in engine.DECODING_NOTE and "end-of-text" in engine.DECODING_NOTE


def test_bridge_with_untrained_bridges_is_said_to_equal_insert(assets):
    recipient, organ = str(assets / "recipient"), str(assets / "foreign-organ")
    bridge = engine.transplant_and_measure(recipient, organ, "bridge", 2)
    insert = engine.transplant_and_measure(recipient, organ, "insert", 2)
    assert bridge.domain_after == pytest.approx(insert.domain_after, rel=1e-6)
    assert "exactly those of insert" in engine.bridge_note(organ, "bridge") and not engine.bridge_note(organ, "insert")


def test_inputs_are_checked_before_anything_runs(assets, monkeypatch):
    recipient, organ = str(assets / "recipient"), str(assets / "organ")

    def never(*args, **kwargs):
        raise AssertionError("the transplant ran before the inputs were checked")

    monkeypatch.setattr(engine, "transplant_and_measure", never)
    for prompt, position, words in [
        ("  ", 2, "prompt is empty"),
        ("x" * 3000, 2, "characters"),
        ("int", 2.5, "whole"),
    ]:
        with pytest.raises(not_hub.errors.NotHubError, match=words):
            engine.check_inputs(recipient, organ, "replace", position, prompt)
    with pytest.raises(not_hub.errors.InvalidPositionError, match="expected 0 <= position <= 4"):
        engine.check_inputs(recipient, organ, "replace", 7, "int f(")


@pytest.fixture
def growth_on_tiny(assets, monkeypatch):
    """The page's growth organ grown from the tiny recipient (the page grows it from its default recipient)."""
    monkeypatch.setattr(engine, "DEFAULT_RECIPIENT", str(assets / "recipient"))
    engine.CACHE._organs.pop(engine.GROWTH_ORGAN_ID, None)
    yield engine.GROWTH_ORGAN_ID
    engine.CACHE._organs.pop(engine.GROWTH_ORGAN_ID, None)


def test_an_untrained_growth_organ_changes_nothing_on_the_page(assets, growth_on_tiny, hash_state):
    recipient, organ = str(assets / "recipient"), growth_on_tiny
    loaded = engine.CACHE.recipient(recipient)
    before = hash_state(loaded.working)
    assert engine.CACHE.organ(organ).config.growth and not engine.CACHE.organ(str(assets / "organ")).config.growth
    assert engine.organ_card(organ) == (engine.GROWTH_CARD, None)  # built here, never said to be on the Hub
    assert "pass their input through unchanged until trained" in engine.organ_metadata(organ)["growth"]
    position = engine.default_position(organ, recipient, "insert")
    assert position == 6 // 3  # where it was grown for
    report = engine.transplant_and_measure(recipient, organ, "insert", position)
    assert report.depth_after == 6 + engine.GROWTH_LAYERS
    assert (report.domain_after, report.general_after) == (report.domain_before, report.general_before)  # exactly
    *_, (untouched, grown) = engine.stream_side_by_side(
        recipient, organ, "insert", position, "int f(", max_new_tokens=6
    )
    assert untouched == grown
    assert "exactly the untouched model's" in engine.growth_note(organ, "insert")
    assert "removes those layers" in engine.growth_note(organ, "replace")
    assert engine.growth_note(str(assets / "organ"), "insert") == ""
    replacing = engine.transplant_and_measure(recipient, str(assets / "foreign-organ"), "replace", 1)
    assert replacing.domain_after != replacing.domain_before  # the replacing organ, for contrast, changes them
    assert hash_state(loaded.working) == before


def test_app_offers_a_growth_organ_that_changes_nothing(client, assets):
    recipient = str(assets / "recipient")
    _meta, _compat, _slider, status, card = client.predict(
        recipient, engine.GROWTH_ORGAN_ID, "insert", api_name="/check"
    )
    assert status.startswith("Compatible") and "untrained growth organ" in card
    _stack, ppl, before, after, status = client.predict(
        recipient, engine.GROWTH_ORGAN_ID, "insert", 2, "int f(", api_name="/transplant"
    )
    assert "exactly the untouched model's" in status and before == after
    assert ppl.count("| 1.00x |") == 2  # domain and general text: the same perplexity


def test_ten_archive_builds_leave_one_archive_with_a_card(assets, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "EXPORT_DIR", tmp_path / "exports")
    recipient, organ = str(assets / "recipient"), str(assets / "foreign-organ")
    paths = [engine.export_folder(recipient, organ, "insert", p % 3) for p in range(10)]
    assert [p.name for p in (tmp_path / "exports").iterdir()] == [Path(paths[-1]).name]
    assert engine.export_folder(recipient, organ, "insert", 0) == paths[-1]  # (9 % 3 == 0) reused, not rebuilt
    with zipfile.ZipFile(paths[-1]) as zf:
        card = zf.read("README.md").decode()
    assert "bfloat16" in card and "float32" in card and "foreign-organ" in card and str(assets) not in card


def test_ten_builds_of_two_transplants_keep_one_archive_on_disk_and_none_after_shutdown(assets, tmp_path):
    """Archives are served from the export folder (a gradio static path), not copied into gradio's cache per build
    (273-294 MB each on the real Space, kept an hour), and the folder goes when the server is stopped (SIGTERM)."""
    import subprocess

    from gradio_client import Client

    port, tmp, gradio_tmp = _free_port(), tmp_path / "tmp", tmp_path / "gradio"
    tmp.mkdir()
    gradio_tmp.mkdir()
    # TMPDIR: the export folder's parent (a fresh process, not the zygote: tempfile reads it at first use)
    env = _app_env(assets, port, GRADIO_TEMP_DIR=str(gradio_tmp), TMPDIR=str(tmp), NOT_HUB_SPACE_TOKEN_DELAY="0")
    proc = subprocess.Popen([sys.executable, str(SPACE / "app.py")], env=env, stderr=subprocess.PIPE)
    try:
        _wait_for_app(proc, port)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        recipient, organ = str(assets / "recipient"), str(assets / "foreign-organ")
        for i in range(10):  # alternating two transplants: every build replaces the archive
            client.predict(recipient, organ, "insert", 2 + i % 2, "int f(", api_name="/transplant")
            client.predict(api_name="/download")
        archives = [p for root in (tmp, gradio_tmp) for p in root.rglob("*.zip")]
        assert len(archives) == 1, archives  # one archive's worth, anywhere: export folder and gradio's cache
        assert archives[0].parent.name == f"not-hub-export-{proc.pid}"
    finally:
        proc.terminate()  # SIGTERM, as a Space is stopped
        proc.wait(timeout=60)
    assert not list(tmp.glob("not-hub-export-*")) and not list(gradio_tmp.rglob("*.zip"))


def test_the_page_speaks_plain_words_and_numbers():
    """No jargon a visitor cannot read (half-open ranges, "residual stream", function names), numbers that fit a cell."""
    import app

    texts = [engine.GROWTH_CARD, app.EXPLANTED, engine._layers_words(10, 13, 30)]
    for jargon in ("residual stream", "bit for bit", "train_bridges", "not_hub.train_organ", "[10, 13)"):
        assert not any(jargon in t for t in texts), jargon
    assert engine._layers_words(10, 13, 30) == "layers 10 to 12 of 30 (numbered from 0)"
    assert engine.number(154147.29) == "154,147" and engine.number(11.441) == "11.44"
    assert engine.ratio(11401.44) == "11,401x" and engine.ratio(0.5912) == "0.59x" and engine.ratio(13.04) == "13.0x"


def test_an_organ_card_with_a_malformed_header_is_shown_not_raised(assets):
    organ = assets / "organ-bad-card"  # (a folder this server offers)
    shutil.copytree(assets / "organ", organ, dirs_exist_ok=True)
    (organ / "README.md").write_text("---\nlicense: [apache\n---\n# My organ\nTrained on my data.\n")
    card, _ = engine.organ_card(str(organ))
    assert "cannot be read" in card and "Trained on my data." in card and "license" not in card
