"""The transplant Space (UI only; the logic is in engine.py).

python spaces/not-hub-transplant/app.py        # http://127.0.0.1:7860
"""

from __future__ import annotations

import html
import os
import signal
import sys
import threading
from pathlib import Path

import gradio as gr

sys.path.insert(0, str(Path(__file__).parent))
import engine  # noqa: E402

import not_hub  # noqa: E402
from not_hub.errors import NotHubError  # noqa: E402

TITLE = "not_hub: Neural Organ Transplantation"
MODES = ["replace", "insert", "bridge"]
HOST = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
PORT = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
CSS = (
    "#compat-table {overflow-x: auto; max-width: 100%} #compat-table table {font-size: 12px; width: 100%; "
    "table-layout: fixed} #compat-table td {word-break: normal; overflow-wrap: anywhere; vertical-align: top}"
)
CONCURRENCY_NOTE = (
    "Requests are queued. Each transplant runs on a shared, cached recipient under a lock and is explanted before "
    "the lock is released, so visitors never see each other's organs (the untouched model is a separate copy)."
)


MODE_HELP = "\n".join(
    f"- **{name}**: {mode.summary}" for name, mode in not_hub.MODES.items() if name in ("replace", "insert", "bridge")
) + (" Until the bridges are trained they are the identity, so bridge gives exactly the numbers and text of insert.")
GLOSSARY = """- **Organ**: a few consecutive decoder layers cut from one model (the *donor*) and trained, published as
  their own small repo.
- **Recipient**: the model the organ is grafted into (here SmolLM2-135M-Instruct, 30 layers).
- **Transplant**: put the organ's layers into the recipient. **Explant** (*Stop and clear*): take them out again;
  the recipient is then exactly what it was. Every request here explants when it is done.
- **Position**: the index of the first recipient layer the organ occupies, counting from 0.
- **Growth organ**: new layers that start as the identity (copies of the recipient's layers with their output
  projections zeroed): inserted untrained they change nothing; trained, they add depth instead of replacing layers.
- **In situ**: the organ was trained at its own place inside the frozen donor.
- **BLOCKS**: a property (hidden size, heads, ...) on which organ and recipient differ, so the organ cannot fit."""
SAMPLE_HELP = (
    "Perplexity is measured on two short samples written for this page: **domain (code)**, six one-line Java/C# "
    "methods (the default organ's domain), and **general text**, two English sentences (to see what the organ costs "
    "elsewhere). Lower is better; the ratio compares with the untouched model on the same text."
)


def _error(err: Exception) -> str:
    return f"**Error:** {err}"


def on_check(recipient, organ, mode):
    """Organ metadata, compatibility table (blocking rows marked) and the slider range."""
    try:
        meta = engine.organ_metadata(organ)
        rows, ok = engine.compatibility(organ, recipient)
        card, url = engine.organ_card(organ)
        meta["card"] = f"[on the Hub]({url})" if url else "shown under *Organ card* below"
        table = "| property | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in meta.items())
        if not ok:
            # Leave the slider as it is (a 0..0 range is an error in Gradio); the red rows say what blocks.
            return table, _compat_html(rows), gr.update(), "**Incompatible**: the rows marked BLOCKS differ.", card
        lo, hi = engine.position_range(organ, recipient, mode)
        value = engine.default_position(organ, recipient, mode)
        status = "Compatible: choose a mode and a position."
        return table, _compat_html(rows), _slider(lo, hi, mode, value), status, card
    except NotHubError as err:
        return "", "", gr.update(), _error(err), ""


def _slider(lo: int, hi: int, mode: str, value: int | None = None):
    """The position slider's range, said in words: the slider sets a typed value outside it to the nearest end."""
    info = f"{mode}: positions {lo} to {hi} for this organ and recipient; a value outside is set to the nearest end."
    extra = {"value": value} if value is not None else {}
    return gr.update(minimum=lo, maximum=hi, info=info, **extra)


def _compat_html(rows) -> str:
    body = "".join(
        f"<tr style='background:{'#f8d7da' if r[3] == 'BLOCKS' else 'transparent'}'>"
        + "".join(f"<td>{html.escape(str(c))}</td>" for c in r)
        + "</tr>"
        for r in rows
    )
    return (
        "<table id='compat'><tr><th>field</th><th>donor</th><th>recipient</th><th>status</th></tr>" + body + "</table>"
    )


def on_mode(recipient, organ, mode):
    try:
        lo, hi = engine.position_range(organ, recipient, mode)
        return _slider(lo, hi, mode)
    except NotHubError:
        return gr.update()


def on_transplant(recipient, organ, mode, position, prompt, request: gr.Request):
    """Transplant, show the stack and perplexities, then stream both generations side by side (until Explant)."""
    stream = engine.STREAMS.start(getattr(request, "session_hash", None))
    try:
        yield from _transplant(recipient, organ, mode, position, prompt, stream)
    finally:
        engine.STREAMS.finish(stream)


def _transplant(recipient, organ, mode, position, prompt, stream):
    try:
        engine.check_inputs(recipient, organ, mode, position, prompt)  # said at once, before the 3 s transplant
        if engine.is_busy(recipient):  # say it: a sweep or another visitor's request holds the shared model
            yield None, "", "", "", "Queued: another request is using the shared model; yours runs right after.", None
        report = engine.transplant_and_measure(recipient, organ, mode, int(position))
    except NotHubError as err:
        yield None, "", "", "", _error(err), None
        return
    if stream.stop.is_set():  # explanted while measuring: show nothing of it
        yield from _explanted(stream)
        return
    table = (
        "| sample | untouched | transplanted | ratio |\n|---|---|---|---|\n"
        f"| domain (code) | {engine.number(report.domain_before)} | {engine.number(report.domain_after)} | "
        f"{engine.ratio(report.domain_after / report.domain_before)} |\n"
        f"| general text | {engine.number(report.general_before)} | {engine.number(report.general_after)} | "
        f"{engine.ratio(report.general_after / report.general_before)} |"
    )
    state = {"mode": mode, "position": int(position), "organ": organ, "recipient": recipient}
    status = (
        f"Transplanted ({mode} at {int(position)}; recipient has {report.depth_after} layers while in use)."
        + engine.bridge_note(organ, mode)
        + engine.growth_note(organ, mode)
    )
    yield report.figure, table, "", "", status, state
    # Per token only the two texts change: the figure (re-rendered as a PNG on every update it is part of), the
    # table, the status and the state are sent once before the stream and once after it.
    before = after = ""
    same = gr.skip()
    try:
        for before, after in engine.stream_side_by_side(
            recipient, organ, mode, int(position), prompt, stop=stream.stop
        ):
            yield same, same, before, after, same, same
    except NotHubError as err:
        yield report.figure, table, "", "", _error(err), state
        return
    if stream.explanted:
        yield from _explanted(stream)
    else:
        yield report.figure, table, before, after, status, state


def _explanted(stream):
    """A stream ended by Explant ends on the explanted state itself. Gradio re-sends a finished stream's last output
    when it completes, which can reach the page after Explant's own update: it must not bring the results back."""
    if stream.explanted:
        yield None, "", "", "", EXPLANTED + STOPPED_NOTE, None


def on_sweep(recipient, organ, mode, progress=gr.Progress()):  # noqa: B008 (gradio injects it)
    try:
        result = engine.sweep(recipient, organ, mode, progress=lambda f, d: progress(f, desc=d))
    except NotHubError as err:
        return None, _error(err)
    return result["figure"], engine.sweep_summary(result, mode)


EXPLANTED = (
    "Explanted: the recipient is back to the untouched model, exactly. (Every request explants when it is done "
    "anyway: the shared model never keeps an organ between requests.)"
)


STOPPED_NOTE = " The running generation was stopped."


def on_explant(state, request: gr.Request):
    """Stop this visitor's running generation (waiting until it has stopped, so none of its updates lands after
    this one), then clear the transplant's results: the page shows the untouched state."""
    stopped = engine.STREAMS.stop(getattr(request, "session_hash", None))
    if not state and not stopped:
        return None, "", "", "", "Nothing to explant: the recipient is untouched.", None
    note = STOPPED_NOTE if stopped else ""
    return None, "", "", "", EXPLANTED + note, None


def on_download(state):
    """Say what the archive will take, then build it."""
    if not state:
        yield None, "Transplant first, then download."
        return
    try:
        yield None, engine.archive_estimate(state["recipient"])
        path = engine.export_folder(state["recipient"], state["organ"], state["mode"], state["position"])
    except NotHubError as err:
        yield None, _error(err)
        return
    yield path, f"Archive ready: {Path(path).name} ({Path(path).stat().st_size / 1e6:,.0f} MB)"


def on_push(state, repo_id, token):
    if not state:
        return "Transplant first, then push."
    try:
        url = engine.push(state["recipient"], state["organ"], state["mode"], state["position"], repo_id, token)
    except NotHubError as err:
        return _error(err)
    return f"Pushed: {url}"


def build() -> gr.Blocks:
    # delete_cache: what gradio still copies into its cache (figures) is removed after an hour (checked every 10
    # minutes); archives are not copied (served from engine.EXPORT_DIR, a static path).
    with gr.Blocks(title=TITLE, delete_cache=(600, 3600)) as demo:
        gr.Markdown(
            f"# {TITLE}\nGraft an *organ* (a few decoder layers trained elsewhere) into a language model, compare "
            "its text and perplexity with the untouched model, and take it out again. Press **Transplant** to try "
            "this page's code organ.",
            elem_id="intro",
        )
        state = gr.State(None)
        with gr.Row(equal_height=False):
            recipient = gr.Textbox(
                engine.DEFAULT_RECIPIENT,
                label="Recipient model (Hub id; empty: this page's)",
                elem_id="recipient-input",
                min_width=160,
            )
            organ = gr.Textbox(
                "",
                label=f"Organ (Hub repo id; empty: this page's organ; {engine.GROWTH_ORGAN_ID}: an untrained growth organ)",
                placeholder=f"{engine.DEFAULT_ORGAN_REPO_ID} (this page's organ)",
                elem_id="organ-input",
                min_width=160,
            )
        with gr.Row(equal_height=False):
            mode = gr.Radio(MODES, value="replace", label="Mode", min_width=160)
            position = gr.Slider(
                0, 27, value=10, step=1, label="Position: the first layer the organ occupies", elem_id="position",
                min_width=160,
            )  # fmt: skip
        prompt = gr.Textbox(engine.DEFAULT_PROMPT, label="Prompt (Enter transplants)", elem_id="prompt")
        with gr.Row():
            go = gr.Button("Transplant", variant="primary", elem_id="transplant", min_width=100)
            explant = gr.Button("Stop and clear", elem_id="explant", min_width=100)
            run_sweep = gr.Button("Try every position", elem_id="sweep", min_width=100)
        status = gr.Markdown(elem_id="status", label="Compatibility")
        run_status = gr.Markdown(elem_id="run-status", label="Transplant status")
        with gr.Row(equal_height=False):
            stack = gr.Plot(label="Layer stack", min_width=300)
            with gr.Column(min_width=300):
                ppl = gr.Markdown(elem_id="perplexity", label="Perplexity")
                with gr.Row(equal_height=False):
                    before = gr.Textbox(label="Untouched model", lines=4, elem_id="before", min_width=160)
                    after = gr.Textbox(label="Transplanted model", lines=4, elem_id="after", min_width=160)
                gr.Markdown(engine.DECODING_NOTE, elem_id="decoding-note")
        sweep_plot = gr.Plot(label="Perplexity vs position")
        sweep_text = gr.Markdown(elem_id="sweep-summary", label="Sweep summary")
        gr.Examples(
            [
                [engine.DEFAULT_RECIPIENT, engine.DEFAULT_ORGAN_REPO_ID, "replace", engine.DEFAULT_PROMPT],
                [
                    engine.DEFAULT_RECIPIENT,
                    engine.DEFAULT_ORGAN_REPO_ID,
                    "insert",
                    "public static void main(String[] a) {",
                ],
                [engine.DEFAULT_RECIPIENT, engine.GROWTH_ORGAN_ID, "insert", engine.DEFAULT_PROMPT],
            ],
            [recipient, organ, mode, prompt],
            label="Examples (click one, then Transplant)",
        )
        with gr.Accordion("Compatibility details", open=False, elem_id="compat-details"):
            check = gr.Button("Check compatibility again", variant="secondary", elem_id="check")
            meta = gr.Markdown(elem_id="organ-meta", label="Organ")
            compat = gr.HTML(elem_id="compat-table")
            gr.Markdown("Rows marked **BLOCKS** (red) prevent the transplant; depth and vocabulary never block.")
        with gr.Accordion("Organ card", open=False):
            card = gr.Markdown(elem_id="organ-card", label="Organ card")
        with gr.Accordion("What the words mean", open=False, elem_id="glossary"):
            gr.Markdown(GLOSSARY + "\n\n" + MODE_HELP + "\n\n" + SAMPLE_HELP + "\n\n" + CONCURRENCY_NOTE)
        with gr.Accordion("Download or push the transplanted model", open=False):
            download = gr.Button("Build archive")
            download_status = gr.Markdown(label="Archive status")
            archive = gr.File(label="Transplanted model (.zip)")
            with gr.Row():
                repo_id = gr.Textbox(label="Hub repo id", placeholder="your-name/smollm2-with-organ")
                token = gr.Textbox(label="Hub token", type="password")
            push = gr.Button("Push to the Hub")
            push_status = gr.Markdown(label="Push status")

        check.click(on_check, [recipient, organ, mode], [meta, compat, position, status, card], api_name="check")
        mode.change(on_mode, [recipient, organ, mode], [position], api_name=False)
        # show_progress="minimal": an elapsed-time counter, no estimate. Gradio's estimate is the mean duration of
        # earlier requests, and a transplant request lasts as long as its stream (seconds after the numbers are
        # shown), so the estimate overstated the wait for the first results.
        go.click(
            on_transplant,
            [recipient, organ, mode, position, prompt],
            [stack, ppl, before, after, run_status, state],
            api_name="transplant",
            show_progress="minimal",
        )
        prompt.submit(  # Enter in the prompt transplants, as the button does
            on_transplant,
            [recipient, organ, mode, position, prompt],
            [stack, ppl, before, after, run_status, state],
            show_progress="minimal",
        )
        run_sweep.click(on_sweep, [recipient, organ, mode], [sweep_plot, sweep_text], api_name="sweep")
        explant.click(on_explant, [state], [stack, ppl, before, after, run_status, state], api_name="explant")
        download.click(on_download, [state], [archive, download_status], api_name="download")
        push.click(on_push, [state, repo_id, token], [push_status], api_name="push")
        demo.load(on_check, [recipient, organ, mode], [meta, compat, position, status, card], api_name=False)
    return demo


def warm_up() -> None:
    """Load the default recipient and organ in the background so the first click is fast."""
    try:
        engine.CACHE.recipient(engine.DEFAULT_RECIPIENT)
        engine.CACHE.organ(engine.DEFAULT_ORGAN)
    except Exception as err:  # the page reports load errors itself on first use
        print(f"warm-up failed: {err}", file=sys.stderr)


if __name__ == "__main__":
    # A Space (or a container) is stopped with SIGTERM: exit normally, so that the export folder goes (atexit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Archives are served from the export folder, one at a time, instead of copied into gradio's cache per build.
    gr.set_static_paths([str(engine.EXPORT_DIR)])
    threading.Thread(target=warm_up, daemon=True).start()
    build().queue(default_concurrency_limit=8).launch(server_name=HOST, server_port=PORT, css=CSS)
