"""Hub conventions: the arguments transformers/huggingface_hub users pass, cards that are kept, lineage the Hub
understands, excision; the Hub parts over HTTP against the local Hub-protocol server (tests/fixtures/hub_server.py)."""

import warnings

import pytest
import torch
import warm_python
from hub_server import LocalHub
from test_hub import run_scenario
from tiny_models import tiny_input_ids, tiny_model
from tiny_tokenizer import tiny_tokenizer
from transformers import AutoModel, AutoModelForCausalLM

import not_hub
from not_hub.errors import InvalidArgumentError, InvalidLayerRangeError, TransplantStateError, UnexpectedArgumentError


@pytest.fixture
def saved(tmp_path):
    organ = not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3), base_model="org/donor")
    organ.save_pretrained(tmp_path / "organ")
    return tmp_path / "organ"


# ----------------------------------------------------------------------------------- from_pretrained arguments


def test_from_pretrained_takes_the_standard_arguments(saved, tmp_path):
    load = not_hub.OrganModel.from_pretrained
    assert {p.dtype for p in load(saved, dtype="auto").parameters()} == {torch.float32}
    assert {p.dtype for p in load(saved, dtype="bfloat16").parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load(saved, dtype=torch.float16).parameters()} == {torch.float16}
    with pytest.warns(FutureWarning, match="torch_dtype"):
        assert {p.dtype for p in load(saved, torch_dtype=torch.bfloat16).parameters()} == {torch.bfloat16}
    for device_map in ("cpu", "auto", {"": "cpu"}, torch.device("cpu")):
        assert {p.device.type for p in load(saved, device_map=device_map).parameters()} == {"cpu"}
    assert load(saved, low_cpu_mem_usage=True, use_safetensors=True) is not None
    organ = load(saved, attn_implementation="eager")
    assert {m.config._attn_implementation for m in organ.modules() if hasattr(m, "config") and m is not organ} == {
        "eager"
    }
    same = load(saved).config
    assert load(saved, config=same).config is same
    (tmp_path / "repo" / "organs").mkdir(parents=True)
    import shutil

    shutil.copytree(saved, tmp_path / "repo" / "organs" / "a")
    assert load(tmp_path / "repo", subfolder="organs/a").config.layer_range == (1, 3)
    # through AutoModel too
    auto = AutoModel.from_pretrained(saved, dtype="auto", device_map="cpu")
    assert isinstance(auto, not_hub.OrganModel) and next(auto.parameters()).dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(use_safetensors=False), UnexpectedArgumentError, "safetensors only"),
        (dict(device_map={"layers.0": "cpu", "layers.1": "cpu"}), UnexpectedArgumentError, "placed whole"),
        (dict(dtype="float33"), InvalidArgumentError, "not a torch dtype"),
        (dict(dtype="float32", torch_dtype="bfloat16"), InvalidArgumentError, "disagree"),
        (dict(attn_implementation="magic"), InvalidArgumentError, "attn_implementation"),
        (dict(subfolder="nowhere"), not_hub.errors.OrganNotFoundError, "subfolder"),
        (dict(mirror="x"), UnexpectedArgumentError, "mirror"),
    ],
)
def test_from_pretrained_refuses_what_cannot_apply(saved, kwargs, error, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(error, match=match):
            not_hub.OrganModel.from_pretrained(saved, **kwargs)


def test_config_describing_another_organ_is_refused(saved):
    other = not_hub.extract_organ(tiny_model("llama"), layer_range=(2, 4)).config
    with pytest.raises(UnexpectedArgumentError, match="another organ"):
        not_hub.OrganModel.from_pretrained(saved, config=other)


# ------------------------------------------------------------------------------------- save_pretrained arguments


def test_save_pretrained_arguments(tmp_path):
    organ = not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3))
    assert organ.save_pretrained(tmp_path / "not-main", is_main_process=False) == []
    assert not (tmp_path / "not-main").exists()
    with pytest.raises(UnexpectedArgumentError, match="safetensors only"):
        organ.save_pretrained(tmp_path / "x", safe_serialization=False)
    with pytest.raises(UnexpectedArgumentError, match="one file"):
        organ.save_pretrained(tmp_path / "x", max_shard_size="10KB")
    with pytest.raises(InvalidArgumentError, match="max_shard_size"):
        organ.save_pretrained(tmp_path / "x", max_shard_size="lots")
    organ.save_pretrained(tmp_path / "ok", max_shard_size="5GB", safe_serialization=True)
    config = (tmp_path / "ok" / "config.json").read_text()
    assert '"architectures": [\n    "OrganModel"\n  ]' in config
    with pytest.raises(UnexpectedArgumentError, match="commit_message"):
        organ.save_pretrained(tmp_path / "x", commit_message="no push asked")


# ------------------------------------------------------------------------------------------------ excision


def test_excision_round_trip(tmp_path, hash_state):
    model = tiny_model("gemma2")  # per-layer kinds (sliding / full) must follow the removal
    ids = tiny_input_ids()
    model.save_pretrained(tmp_path / "original")  # saving fills config.dtype/architectures: hash after it
    before = hash_state(model)
    with torch.no_grad():
        original = model(ids).logits
    organ, excision = not_hub.excise(model, (2, 4))
    assert model.config.num_hidden_layers == len(model.model.layers) == 4 and organ.config.layer_range == (2, 4)
    with torch.no_grad():
        pruned = model(ids).logits
    model.save_pretrained(tmp_path / "pruned")
    organ.save_pretrained(tmp_path / "organ")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")  # plain transformers
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruned)
    excision.explant()
    assert hash_state(model) == before
    # put back into the reloaded pruned model: the original model's logits again
    back = not_hub.OrganModel.from_pretrained(tmp_path / "organ")
    with back.transplanted(reloaded, position=2, mode="insert"), torch.no_grad():
        assert torch.equal(reloaded(ids).logits, original)


def test_excision_refuses_bad_ranges_and_keeps_order(hash_state):
    model = tiny_model("llama")
    before = hash_state(model)
    for bad in ((0, 6), (4, 2), (5, 9)):
        with pytest.raises(InvalidLayerRangeError):
            not_hub.excise(model, bad)
    assert hash_state(model) == before
    _, excision = not_hub.excise(model, (1, 2))
    organ = not_hub.extract_organ(tiny_model("llama", seed=2), layer_range=(0, 1))
    later = organ.transplant_into(model, position=3, mode="insert")
    with pytest.raises(TransplantStateError, match="newest first"):
        excision.explant()
    later.explant()
    excision.explant()
    assert hash_state(model) == before


def test_cli_excise(tmp_path, capsys):
    from not_hub.cli import main

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    argv = ["excise", str(tmp_path / "model"), "--layer-range", "2", "4", "--out", str(tmp_path / "pruned")]
    assert main([*argv, "--organ-out", str(tmp_path / "organ")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").config.num_hidden_layers == 4
    assert not_hub.OrganModel.from_pretrained(tmp_path / "organ").config.layer_range == (2, 4)
    assert main([*argv[:3], "0", "6", "--out", str(tmp_path / "all")]) == 1
    assert "keep at least one" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- over HTTP


@pytest.fixture
def local_hub():
    server = LocalHub().start()
    yield server
    server.stop()


def test_push_arguments_cards_and_lineage_over_http(local_hub, tmp_path):
    hub = local_hub
    out = run_scenario(
        hub,
        tmp_path,
        """
        from huggingface_hub import HfApi, ModelCard
        from not_hub.errors import InvalidArgumentError
        organ = not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3), base_model="org/donor")
        organ.config.training = {"method": "standalone", "data": {"sources": ["org/code-dataset", "local.txt"]}}
        url = organ.push_to_hub("user/organ", commit_description="why this organ", tags=["code"])
        card = ModelCard.load("user/organ")
        assert card.data.base_model == "org/donor" and card.data.base_model_relation == "adapter", card.data
        assert card.data.pipeline_tag is None and "code" in card.data.tags and card.data.datasets == ["org/code-dataset"]
        organ.push_to_hub("user/organ", branch="dev")  # ModelHubMixin's name for the branch
        assert not_hub.OrganModel.from_pretrained("user/organ", revision="dev").config.layer_range == (1, 3)
        try:
            organ.push_to_hub("user/organ", branch="dev", revision="main")
            raise SystemExit("disagreeing branch/revision accepted")
        except InvalidArgumentError:
            pass
        organ.save_pretrained("local-organ", push_to_hub=True, repo_id="user/pushed-on-save", commit_message="m")
        assert not_hub.OrganModel.from_pretrained("user/pushed-on-save").config.layer_range == (1, 3)
        # a hand-written card survives the next push; the organ's metadata is merged into its YAML
        HfApi().upload_file(path_or_fileobj=b"---\\nlicense: mit\\ntags: [mine]\\n---\\n# My organ\\nHand-written.\\n",
                            path_in_repo="README.md", repo_id="user/organ")
        organ.push_to_hub("user/organ")
        card = ModelCard.load("user/organ")
        assert "Hand-written." in card.text and card.data.license == "mit", card.content
        assert {"mine", "not_hub", "organ"} <= set(card.data.tags) and card.data.base_model == "org/donor"
        # force_download fetches again; the second load comes from the refreshed cache
        first = not_hub.OrganModel.from_pretrained("user/organ")
        again = not_hub.OrganModel.from_pretrained("user/organ", force_download=True)
        assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
        # a transplanted recipient names recipient and donor as base models, with the merge relation
        recipient = tiny_model("llama")
        recipient.name_or_path = "org/recipient"
        organ.transplant_into(recipient, position=1)
        not_hub.push_recipient(recipient, "user/transplanted")
        card = ModelCard.load("user/transplanted")
        assert card.data.base_model == ["org/recipient", "org/donor"] and card.data.base_model_relation == "merge"
        print("CONVENTIONS-OK", url)
    """,
    )
    assert "CONVENTIONS-OK" in out
    repo = hub.state.repos["user/organ"]
    assert ("Upload organ layers [1, 3) of org/donor", "why this organ") in repo.messages.values()
    commits = [ua for m, p, ua in hub.state.requests if m == "POST" and "/api/models/user/organ/commit/" in p]
    assert commits and f"not_hub/{not_hub.__version__}" in commits[0], commits  # library_name in the User-Agent
    downloads = [ua for m, p, ua in hub.state.requests if m == "GET" and p.endswith("/model.safetensors")]
    assert len(downloads) >= 2 and all("not_hub/" in ua for ua in downloads)  # force_download went out again


# ---------------------------------------------------------------------------------------------- the CLI, like hf


def test_cli_output_formats_and_token_everywhere(tmp_path, capsys):
    import json

    from not_hub.cli import build_parser, main

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "no-tokenizer")  # inspect --recipient needs no tokenizer
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    not_hub.extract_organ(model, layer_range=(2, 4)).save_pretrained(tmp_path / "organ")
    from tiny_tokenizer import code_documents

    (tmp_path / "docs.txt").write_text("\n".join(code_documents(60)))
    capsys.readouterr()
    assert (
        main(["inspect", str(tmp_path / "organ"), "--recipient", str(tmp_path / "no-tokenizer"), "--format", "json"])
        == 0
    )
    doc = json.loads(capsys.readouterr().out)  # one JSON document, nothing else on stdout
    assert doc["layer_range"] == [2, 4] and doc["compatibility"]["compatible"] is True
    assert main(["inspect", str(tmp_path / "organ")]) == 0
    assert "layer_range" in capsys.readouterr().out
    argv = ["evaluate", str(tmp_path / "model"), "--organ", str(tmp_path / "organ"), "--position", "2",
            "--data", str(tmp_path / "docs.txt"), "--unit", "line", "--format", "json"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["perplexity"] > 1 and doc["transplanted"]["position"] == 2
    parser = build_parser()
    for command in ("extract", "inspect", "transplant", "push", "pull", "search", "train", "sweep", "recover",
                    "evaluate", "excise"):  # fmt: skip
        sub = parser._subparsers._group_actions[0].choices[command]
        assert any("--token" in a.option_strings for a in sub._actions), command


def test_cli_hub_commands_json_quiet_and_unreachable(local_hub, tmp_path):
    out = run_scenario(
        local_hub,
        tmp_path,
        """
        import contextlib, io, json, socket
        from not_hub.cli import main
        not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3), base_model="org/donor").save_pretrained("o")
        assert main(["push", "o", "user/organ", "--commit-description", "d", "--tags", "code"]) == 0
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["pull", "user/organ", "--format", "json"]) == 0
            assert main(["search", "-q"]) == 0
        lines = buf.getvalue()
        pulled = json.loads(lines[: lines.rindex("}") + 1])
        assert pulled["layer_range"] == [1, 3] and pulled["tensors_verified"] > 0
        assert lines.strip().endswith("user/organ")
        print("HUB-CLI-OK")
    """,
    )
    assert "HUB-CLI-OK" in out
    import socket
    import sys

    # A port nobody listens on, held (bound, not listening) for the whole call: a port closed again could be taken
    # meanwhile by a parallel test's server (pytest -n), which would then receive this test's requests.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
        env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("HF_")}
        env.update(HF_ENDPOINT=dead, HF_HOME=str(tmp_path / "home2"), HF_TOKEN="t", HF_HUB_DISABLE_XET="1")
        not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3)).save_pretrained(tmp_path / "o2")
        result = warm_python.run(
            [sys.executable, "-m", "not_hub.cli", "push", str(tmp_path / "o2"), "user/organ"],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().startswith("error:") and "could not be reached" in result.stderr
