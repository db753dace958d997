"""Growth organs and growth sets from the command line: `not-hub grow`, then `train`, then `push`, as the API does."""

import json

import pytest
import torch
from test_hub import local_hub, run_scenario  # noqa: F401  (the local Hub server fixture)
from tiny_models import tiny_input_ids, tiny_model
from tiny_tokenizer import code_documents, tiny_tokenizer

import not_hub
from not_hub.cli import main


@pytest.fixture
def workspace(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "train.txt").write_text("\n".join(code_documents(120)))
    return tmp_path


def _train(w, organ, out, *extra):
    data = ["--data", str(w / "train.txt"), "--unit", "line", "--block-size", "32", "--eval-docs", "4"]
    args = ["train", str(organ), "--donor", str(w / "model"), "--out", str(out), "--max-steps", "2", "--lr", "1e-2"]
    return main([*args, *data, "--batch-size", "4", *extra])


def _logits(model):
    with torch.no_grad():
        return model(tiny_input_ids()).logits


def test_a_growth_organ_is_made_trained_and_grafted_from_the_cli(workspace):
    w = workspace
    assert main(["grow", str(w / "model"), "--position", "2", "--num-layers", "2", "--out", str(w / "grown")]) == 0
    grown = not_hub.OrganModel.from_pretrained(w / "grown")
    assert grown.config.default_transplant == {"mode": "insert", "position": 2} and grown.config.growth
    model = tiny_model("llama")
    untouched = _logits(model)
    with grown.transplanted(model):  # identity layers: the output is unchanged until trained
        assert torch.equal(_logits(model), untouched)
    assert _train(w, w / "grown", w / "trained") == 0
    trained = not_hub.OrganModel.from_pretrained(w / "trained")
    assert trained.config.training["steps"] == 2
    with trained.transplanted(model):
        assert model.config.num_hidden_layers == 8 and not torch.equal(_logits(model), untouched)


def test_a_growth_set_is_made_trained_jointly_and_pushed_from_the_cli(workspace, local_hub, tmp_path):  # noqa: F811
    w = workspace
    assert main(["grow", str(w / "model"), "--every", "2", "--out", str(w / "set")]) == 0
    manifest = json.loads((w / "set" / "organ_set.json").read_text())
    assert [(e["mode"], e["position"]) for e in manifest["organs"]] == [("insert", 2), ("insert", 5), ("insert", 8)]
    donor_before = hash_state_of(w / "model")
    assert _train(w, w / "set", w / "trained-set") == 0
    assert hash_state_of(w / "model") == donor_before
    trained = not_hub.OrganSet.from_pretrained(w / "trained-set")
    model = tiny_model("llama")
    untouched = _logits(model)
    transplants = trained.transplant_into(model)
    assert model.config.num_hidden_layers == 9 and not torch.equal(_logits(model), untouched)
    expected = _logits(model)
    for t in reversed(transplants):
        t.explant()
    assert torch.equal(_logits(model), untouched)
    torch.save(expected, w / "expected.pt")
    run_scenario(
        local_hub,
        tmp_path,
        f"""
        from not_hub.cli import main
        assert main(["push", {str(w / "trained-set")!r}, "user/growth-set"]) == 0
        model = tiny_model("llama")
        not_hub.OrganSet.from_pretrained("user/growth-set").transplant_into(model)
        with torch.no_grad():
            assert torch.equal(model(tiny_input_ids()).logits, torch.load({str(w / "expected.pt")!r}))
        """,
    )


def hash_state_of(folder):
    return (folder / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["grow", "{model}", "--out", "{out}"], "--position P"),
        (["grow", "{model}", "--position", "2", "--every", "2", "--out", "{out}"], "not both"),
        (["grow", "{model}", "--every", "9", "--out", "{out}"], "--every 9"),
        (["grow", "{model}", "--position", "9", "--out", "{out}"], "position=9"),
    ],
    ids=["neither", "both", "every-too-large", "position-out-of-range"],
)
def test_grow_refuses_bad_options_in_one_line(workspace, capsys, argv, words):
    w = workspace
    assert main([a.format(model=w / "model", out=w / "out") for a in argv]) == 1
    err = capsys.readouterr().err  # (loading progress bars may come first)
    assert err.strip().splitlines()[-1].startswith("error: ") and words in err and "Traceback" not in err
    assert not (w / "out").exists()


def test_a_set_refuses_a_training_method_other_than_in_situ(workspace, capsys):
    w = workspace
    assert main(["grow", str(w / "model"), "--every", "3", "--out", str(w / "set")]) == 0
    assert _train(w, w / "set", w / "trained", "--method", "standalone") == 1
    assert "cannot train an organ set" in capsys.readouterr().err and not (w / "trained").exists()
