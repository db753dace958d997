"""Organs over real HTTP: the huggingface_hub client against the local Hub-protocol server (tests/fixtures).

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import, so each scenario runs in a fresh process
with its environment set; the server runs in this process on 127.0.0.1.
"""

import os
import sys
import textwrap
from pathlib import Path

import pytest
import warm_python
from hub_server import LocalHub
from tiny_models import tiny_model

import not_hub

SCENARIO_PRELUDE = """
import sys, torch, copy
sys.path.insert(0, {fixtures!r})
import not_hub
from tiny_models import tiny_model, tiny_input_ids
"""


@pytest.fixture(params=[False, True], ids=["regular-upload", "lfs-upload"])
def hub(request):
    server = LocalHub(lfs=request.param).start()
    yield server
    server.stop()


@pytest.fixture
def local_hub():
    server = LocalHub().start()
    yield server
    server.stop()


def run_scenario(
    hub, tmp_path: Path, code: str, *, xet: bool = False, offline: bool = False, prelude: bool = True
) -> str:
    """Run `code` in a fresh Python process against `hub`; with `prelude=False` not_hub is never imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(tmp_path / "hf_home"),
        HF_TOKEN="test-token",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    if not xet:
        env["HF_HUB_DISABLE_XET"] = "1"
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    fixtures = str(Path(__file__).parent / "fixtures")
    script = (SCENARIO_PRELUDE.format(fixtures=fixtures) if prelude else "") + textwrap.dedent(code)
    if not prelude:
        script += "\nassert 'not_hub' not in __import__('sys').modules\n"
    out = warm_python.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_push_then_load_by_repo_id_revision_and_offline(hub, tmp_path):
    xet = not hub.state.lfs  # regular uploads must work with hf_xet active; LFS needs Xet disabled
    run_scenario(
        hub,
        tmp_path,
        """
        donor = tiny_model("llama")
        organ = not_hub.extract_organ(donor, layer_range=(1, 3), base_model="org/tiny-llama")
        url = organ.push_to_hub("user/tiny-organ")
        assert "/commit/" in url, url
        loaded = not_hub.OrganModel.from_pretrained("user/tiny-organ")
        for k, v in organ.state_dict().items():
            assert torch.equal(v, loaded.state_dict()[k]), k
        # A second organ on a branch: the organ's revision, not the donor's.
        other = not_hub.extract_organ(donor, layer_range=(3, 5), base_model="org/tiny-llama")
        other.push_to_hub("user/tiny-organ", revision="v2")
        assert not_hub.OrganModel.from_pretrained("user/tiny-organ", revision="v2").config.layer_range == (3, 5)
        assert not_hub.OrganModel.from_pretrained("user/tiny-organ").config.layer_range == (1, 3)
        from transformers import AutoModel
        assert isinstance(AutoModel.from_pretrained("user/tiny-organ"), not_hub.OrganModel)
        rec = loaded.transplant_into(donor, position=0)
        assert donor.config.transplants[0]["organ"] == "user/tiny-organ"
        print("OK")
    """,
        xet=xet,
    )
    assert bool(hub.state.lfs_objects) == hub.state.lfs  # the weights really took the LFS path when asked to
    # Offline: served from the cache the first process filled.
    out = run_scenario(
        hub,
        tmp_path,
        """
        organ = not_hub.OrganModel.from_pretrained("user/tiny-organ")
        assert organ.config.layer_range == (1, 3)
        try:
            not_hub.OrganModel.from_pretrained("user/never-downloaded")
        except not_hub.errors.OrganNotFoundError as err:
            assert "user/never-downloaded" in str(err) and "not-hub pull" in str(err), err
        print("OFFLINE-OK")
    """,
        offline=True,
    )
    assert "OFFLINE-OK" in out


def test_one_call_from_an_organ_repo_id_to_a_grafted_model_and_a_pipeline(local_hub, tmp_path):
    run_scenario(
        local_hub,
        tmp_path,
        """
        from tiny_tokenizer import tiny_tokenizer
        from transformers import AutoModelForCausalLM, pipeline
        base = tiny_model("llama")
        base.push_to_hub("org/tiny-llama")
        tiny_tokenizer().push_to_hub("org/tiny-llama")
        not_hub.extract_organ(tiny_model("llama", seed=4), layer_range=(2, 4), base_model="org/tiny-llama").push_to_hub(
            "user/organ"
        )
        model, tokenizer = not_hub.load_grafted("user/organ")
        expected = AutoModelForCausalLM.from_pretrained("org/tiny-llama")  # the five lines it replaces
        untouched = copy.deepcopy(expected)
        not_hub.OrganModel.from_pretrained("user/organ").transplant_into(expected)
        ids = tiny_input_ids()
        with torch.no_grad():
            assert torch.equal(model(ids).logits, expected(ids).logits)
        assert model.config.transplants[0]["organ"] == "user/organ"
        text = pipeline("text-generation", model=model, tokenizer=tokenizer)("int f", max_new_tokens=4, do_sample=False)
        assert text[0]["generated_text"].startswith("int f"), text
        not_hub.transplants_of(model)[0].explant()
        with torch.no_grad():
            assert torch.equal(model(ids).logits, untouched(ids).logits)
        # The standard arguments reach both loads: the organ's revision, the dtype of the whole grafted model.
        not_hub.extract_organ(base, layer_range=(1, 2), base_model="org/tiny-llama").push_to_hub("user/organ", revision="v2")
        m16, _ = not_hub.load_grafted("user/organ", revision="v2", dtype=torch.bfloat16)
        assert m16.config.transplants[0]["position"] == 1 and m16.config.transplants[0]["organ_revision"] == "v2"
        assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
        print("ONE-CALL-OK")
    """,
    )
    out = run_scenario(  # offline, from the cache the first process filled; both downloads honour it
        local_hub,
        tmp_path,
        """
        model, tokenizer = not_hub.load_grafted("user/organ", local_files_only=True)
        assert len(not_hub.transplants_of(model)) == 1 and tokenizer("ab")["input_ids"]
        print("OFFLINE-OK")
    """,
        offline=True,
    )
    assert "OFFLINE-OK" in out


SILENT_HUB = """
import time, not_hub
organ = not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3))
for what, call in [
    ("load", lambda: not_hub.OrganModel.from_pretrained("user/organ")),
    ("push", lambda: organ.push_to_hub("user/organ")),
    ("search", lambda: not_hub.list_organs(base_model="org/base")),
]:
    t0 = time.perf_counter()
    try:
        call()
    except (not_hub.errors.OrganNotFoundError, not_hub.errors.HubConnectionError) as err:
        print(what, type(err).__name__, round(time.perf_counter() - t0, 1), str(err)[:200])
"""


def test_a_hub_that_accepts_and_never_answers_gets_a_bounded_wait_and_a_named_error(tmp_path):
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = []  # connections accepted and never answered

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), HF_TOKEN="t", NOT_HUB_HUB_TIMEOUT="1")
        script = SCENARIO_PRELUDE.format(fixtures=str(Path(__file__).parent / "fixtures")) + SILENT_HUB
        out = warm_python.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    finally:
        server.close()
        for conn in held:
            conn.close()
    lines = out.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["load", "push", "search"], out.stdout + out.stderr[-3000:]
    for line in lines:
        # bounded: 1 s per request; a timed-out request is not retried (huggingface_hub's back-off would add 23 s)
        assert float(line.split()[2]) < 6, line
    assert "no answer within 1 s" in lines[0]


def _seed_organ(hub, tmp_path) -> None:
    """An organ on the local Hub as setup (committed server-side; pushing is tested over HTTP elsewhere)."""
    not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3)).save_pretrained(tmp_path / "seeded-organ")
    hub.seed("user/organ", tmp_path / "seeded-organ")


def test_unknown_repo_revision_and_tampered_download(local_hub, tmp_path):
    hub = local_hub
    _seed_organ(hub, tmp_path)
    blob = hub.state.repos["user/organ"].commits[hub.state.repos["user/organ"].branches["main"]]["model.safetensors"]
    altered = bytearray(blob)
    altered[-1] ^= 1
    hub.state.tamper[("user/organ", "model.safetensors")] = bytes(altered)
    run_scenario(
        hub,
        tmp_path,
        """
        from not_hub.errors import IntegrityError, OrganNotFoundError
        for repo, rev, expected in [("user/missing", None, "was not found"), ("user/organ", "nope", "no revision")]:
            try:
                not_hub.OrganModel.from_pretrained(repo, revision=rev)
                raise SystemExit(f"{repo}@{rev} loaded")
            except OrganNotFoundError as err:
                assert expected in str(err), err
        try:
            not_hub.OrganModel.from_pretrained("user/organ")
            raise SystemExit("tampered download loaded")
        except IntegrityError as err:
            assert "sha256" in str(err), err
        print("OK")
    """,
    )
    # The bad download was evicted from the cache: once the server serves the right bytes, a retry loads.
    hub.state.tamper.clear()
    run_scenario(
        hub,
        tmp_path,
        """
        organ = not_hub.OrganModel.from_pretrained("user/organ")
        assert organ.config.layer_range == (1, 3)
    """,
    )


def test_list_organs_cli_search_and_pull_and_non_organ_repo(local_hub, tmp_path):
    out = run_scenario(
        local_hub,
        tmp_path,
        """
        from not_hub.cli import main
        from not_hub.errors import CheckpointFormatError
        a = tiny_model("llama")
        not_hub.extract_organ(a, layer_range=(1, 3), base_model="org/model-a").push_to_hub("user/organ-a")
        not_hub.extract_organ(a, layer_range=(2, 4), base_model="org/model-b").push_to_hub("team/organ-b")
        a.push_to_hub("user/plain-llama")  # a normal transformers repo: not an organ
        assert sorted(o.repo_id for o in not_hub.list_organs()) == ["team/organ-b", "user/organ-a"]
        (found,) = not_hub.list_organs("org/model-a")
        assert found.repo_id == "user/organ-a" and found.base_model == "org/model-a", found
        assert [o.repo_id for o in not_hub.list_organs(author="team")] == ["team/organ-b"]
        try:
            not_hub.OrganModel.from_pretrained("user/plain-llama")
            raise SystemExit("a non-organ repo loaded")
        except CheckpointFormatError as err:
            assert "model_type='llama'" in str(err), err
        assert main(["search", "--base-model", "org/model-b"]) == 0
        assert main(["pull", "user/organ-a"]) == 0
        assert main(["pull", "user/nothing-here"]) == 1
    """,
    )
    assert "team/organ-b\tbase_model=org/model-b" in out
    assert "user/organ-a: layers [1, 3) of org/model-a" in out


def test_transplanted_recipient_push_reloads_without_not_hub(local_hub, tmp_path):
    run_scenario(
        local_hub,
        tmp_path,
        """
        from safetensors.torch import save_file
        from huggingface_hub import ModelCard
        recipient = tiny_model("llama")
        organ = not_hub.extract_organ(tiny_model("llama", seed=4), layer_range=(1, 3), base_model="org/donor")
        organ.push_to_hub("user/donor-organ")
        organ = not_hub.OrganModel.from_pretrained("user/donor-organ")
        recipient.name_or_path = "org/recipient"
        organ.transplant_into(recipient, position=2, mode="insert")
        not_hub.push_recipient(recipient, "user/transplanted")
        ids = tiny_input_ids()
        save_file({"ids": ids, "logits": recipient(ids).logits.detach()}, "expected.safetensors")
        card = ModelCard.load("user/transplanted")
        assert card.data.base_model == ["org/recipient", "org/donor"] and "not_hub" in card.data.tags, card.data
        assert card.data.base_model_relation == "merge", card.data
        assert "| user/donor-organ |" in card.text and "| 2 | insert |" in card.text, card.text
    """,
    )
    out = run_scenario(
        local_hub,
        tmp_path,
        """
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("user/transplanted", attn_implementation="eager").eval()
        expected = load_file("expected.safetensors")
        torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], rtol=0, atol=0)
        print("layers", model.config.num_hidden_layers, model.config.transplants[0]["organ"])
    """,
        prelude=False,
    )
    assert "layers 8 user/donor-organ" in out


def test_server_gone_uses_the_cache_or_says_what_to_do(local_hub, tmp_path):
    run_scenario(
        local_hub,
        tmp_path,
        """
        not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3)).push_to_hub("user/organ")
        not_hub.OrganModel.from_pretrained("user/organ")  # fills the cache
    """,
    )
    local_hub.stop()
    import socket

    with socket.socket() as held:  # the gone server's port stays unanswered (a parallel test cannot take it)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", int(local_hub.endpoint.rsplit(":", 1)[1])))
        run_scenario(
            local_hub,
            tmp_path,
            """
            from not_hub.errors import OrganNotFoundError
            assert not_hub.OrganModel.from_pretrained("user/organ").config.layer_range == (1, 3)
            try:
                not_hub.OrganModel.from_pretrained("user/other")
                raise SystemExit("loaded without server or cache")
            except OrganNotFoundError as err:
                assert "user/other" in str(err), err
        """,
        )


def test_interrupted_download_and_malformed_repo_ids_are_named_errors(local_hub, tmp_path):
    """A transfer cut off half-way is a HubConnectionError (no raw RemoteProtocolError), nothing partial is used,
    and the retry after the server recovers loads the organ; malformed ids are refused before any request."""
    hub = local_hub
    _seed_organ(hub, tmp_path)
    hub.state.truncate.add(("user/organ", "model.safetensors"))
    run_scenario(
        hub,
        tmp_path,
        """
        from not_hub.errors import HubConnectionError, InvalidRepoIdError
        from not_hub.cli import main
        import inspect, huggingface_hub.file_download
        # huggingface_hub resumes a cut transfer 5 times, 1 s apart; one resume shows the same, 8 s sooner
        inspect.unwrap(huggingface_hub.file_download.http_get).__kwdefaults__["_nb_retries"] = 1
        try:
            not_hub.OrganModel.from_pretrained("user/organ")
            raise SystemExit("a half-downloaded organ loaded")
        except HubConnectionError as err:
            assert "user/organ" in str(err) and "interrupted" in str(err), err
        assert main(["pull", "user/organ"]) == 1
        for bad in ["a/..", " user/organ", "user/" + "x" * 200]:
            try:
                not_hub.OrganModel.from_pretrained(bad)
                raise SystemExit(f"{bad!r} accepted")
            except InvalidRepoIdError as err:
                assert "malformed" in str(err), err
            try:
                not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3)).push_to_hub(bad)
                raise SystemExit(f"push to {bad!r} accepted")
            except InvalidRepoIdError:
                pass
        print("OK")
    """,
    )
    hub.state.truncate.clear()
    out = run_scenario(hub, tmp_path, 'not_hub.OrganModel.from_pretrained("user/organ"); print("RETRY-OK")')
    assert "RETRY-OK" in out


def test_odd_hub_answers_and_arguments_are_named_errors(local_hub, tmp_path):
    """A server error is not "not on the Hub", a non-JSON answer is not a raw JSONDecodeError, a card whose YAML
    cannot be read safely does not stop a push, and tags / revisions that are not what they look like are refused."""
    hub = local_hub
    hub.state.faults["/user/err500"] = (500, b'{"error": "internal"}')
    hub.state.faults["/user/err501"] = (501, b'{"error": "not implemented"}')  # (5xx huggingface_hub does not retry)
    hub.state.faults["/user/garbage"] = (200, b"<html>not json</html>")
    out = run_scenario(
        hub,
        tmp_path,
        """
        from huggingface_hub import HfApi
        from not_hub.errors import HubRequestError, InvalidArgumentError
        organ = not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3))
        organ.push_to_hub("user/organ")
        cases = [
            (lambda: not_hub.OrganModel.from_pretrained("user/err500"), HubRequestError, "answered HTTP 500"),
            (lambda: not_hub.OrganModel.from_pretrained("user/garbage"), HubRequestError, "not JSON"),
            (lambda: organ.push_to_hub("user/err501"), HubRequestError, "answered HTTP 501"),
            (lambda: organ.push_to_hub("user/garbage"), HubRequestError, "not JSON"),
            (lambda: not_hub.OrganModel.from_pretrained("user/organ", revision="../../x"), InvalidArgumentError, "'..'"),
            (lambda: organ.push_to_hub("user/organ", tags="code"), InvalidArgumentError, "not a list of strings"),
            (lambda: organ.push_to_hub("user/organ", tags=[None, 5]), InvalidArgumentError, "non-empty string"),
        ]
        for call, error, words in cases:
            try:
                call()
                raise SystemExit(f"accepted: {words}")
            except error as err:
                assert words in str(err), err
        api = HfApi()
        for repo, yaml_text in [("user/hostile", "license: !!python/object/apply:os.system ['echo pwned']"),
                                ("user/malformed", "license: [unclosed")]:
            api.create_repo(repo, exist_ok=True)
            api.upload_file(path_or_fileobj=f"---\\n{yaml_text}\\n---\\nOur notes.\\n".encode(), path_in_repo="README.md",
                            repo_id=repo)
            organ.push_to_hub(repo)  # the card's YAML cannot be read safely: replaced, its text kept
        print("OK")
    """,
    )
    assert "OK" in out
    for repo in ("user/hostile", "user/malformed"):
        card = hub.state.repos[repo].commits[hub.state.repos[repo].branches["main"]]["README.md"].decode()
        assert "Our notes." in card and "library_name: not_hub" in card and "python/object" not in card
    assert len(hub.state.repos["user/organ"].commits) == 2  # the initial commit and the one good push
