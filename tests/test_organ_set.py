"""Several organs as one repo: growth at several depths, trained jointly, published as one set, grafted back exactly."""

import pytest
import torch
from tiny_models import tiny_input_ids, tiny_model
from tiny_tokenizer import code_documents, tiny_tokenizer

import not_hub
from not_hub.errors import CheckpointFormatError, InvalidPositionError


def _trained_set(tmp_path):
    """Growth organs interleaved through a 6-layer llama (before layers 2 and 4), trained jointly in situ."""
    model = tiny_model("llama")
    grown = [not_hub.grow_organ(model, position=p) for p in (2, 4)]
    first = grown[0].transplant_into(model, position=2)  # (7 layers now: the original layer 4 sits at 5)
    second = grown[1].transplant_into(model, position=5)
    blocks = not_hub.make_blocks(not_hub.split_documents(code_documents(80), seed=0), tiny_tokenizer(), 32)
    not_hub.recover(model, [first, second], blocks, radius=0, max_steps=3, lr=1e-2, progress=False)
    return model, not_hub.OrganSet.from_transplants(model)


def test_a_jointly_trained_growth_set_grafts_back_exactly_in_one_call(tmp_path):
    model, organ_set = _trained_set(tmp_path)
    ids = tiny_input_ids()
    with torch.no_grad():
        expected = model(ids).logits
        untouched = tiny_model("llama")(ids).logits
    assert not torch.equal(expected, untouched)  # the new blocks trained
    organ_set.save_pretrained(tmp_path / "set")
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == [
        "README.md",
        "organ-0",
        "organ-1",
        "organ_set.json",
    ]

    fresh = tiny_model("llama")
    transplants = not_hub.OrganSet.from_pretrained(tmp_path / "set").transplant_into(fresh)
    assert fresh.config.num_hidden_layers == 8 and [t.position for t in transplants] == [2, 5]
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)
    for t in reversed(transplants):
        t.explant()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, untouched)

    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    grafted, _ = not_hub.load_grafted(tmp_path / "set", recipient=base)  # the one-call entry point takes sets too
    assert [t["position"] for t in grafted.config.transplants] == [2, 5]
    with torch.no_grad():  # (transformers loads the base with sdpa attention, the test models use eager)
        torch.testing.assert_close(grafted(ids).logits, expected, rtol=1e-5, atol=1e-6)


def test_a_set_that_does_not_fit_leaves_the_recipient_as_it_was(tmp_path, hash_state):
    _, organ_set = _trained_set(tmp_path)
    organ_set.placements[1]["position"] = 40  # the second organ cannot go there
    recipient = tiny_model("llama")
    before = hash_state(recipient)
    with pytest.raises(InvalidPositionError):
        organ_set.transplant_into(recipient)
    assert hash_state(recipient) == before and not not_hub.transplants_of(recipient)


def test_a_malformed_manifest_is_a_format_error(tmp_path):
    _, organ_set = _trained_set(tmp_path)
    organ_set.save_pretrained(tmp_path / "set")
    (tmp_path / "set" / "organ_set.json").write_text('{"organs": [{"subfolder": "../elsewhere", "mode": "insert"}]}')
    with pytest.raises(CheckpointFormatError, match="not an organ-set manifest"):
        not_hub.OrganSet.from_pretrained(tmp_path / "set")
