"""Growth organs (LLaMA-Pro): identity layers that add depth; refused where zeroing is not an identity."""

import warnings

import pytest
import torch
from tiny_models import tiny_input_ids, tiny_model
from tiny_tokenizer import code_documents, tiny_tokenizer

import not_hub
from not_hub.data import make_blocks, split_documents
from not_hub.errors import InvalidArgumentError, UnsupportedArchitectureError


@pytest.mark.parametrize(
    "family, overrides, words",
    [("opt", {"do_layer_norm_before": False}, "do_layer_norm_before=False"),
     ("bloom", {"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm")],
)  # fmt: skip
def test_post_norm_configs_are_refused(family, overrides, words, hash_state):
    model = tiny_model(family, **overrides)
    before = hash_state(model)
    with pytest.raises(UnsupportedArchitectureError, match=words):
        not_hub.grow_organ(model, position=2)
    assert hash_state(model) == before


def test_out_of_range_growth_is_refused():
    model = tiny_model("llama")
    for kwargs, name in [({"position": 7}, "position"), ({"position": 2, "num_layers": 0}, "num_layers"),
                         ({"position": 2, "source": 6}, "source")]:  # fmt: skip
        with pytest.raises(InvalidArgumentError, match=name):
            not_hub.grow_organ(model, **kwargs)


def test_a_growth_organ_round_trips_and_trains_in_place_of_nothing(tmp_path, hash_state):
    model = tiny_model("llama")
    before = hash_state(model)
    organ = not_hub.grow_organ(model, position=6, num_layers=1)  # on top of the stack
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the growth metadata is a known field: no unknown-key warning
        organ.save_pretrained(tmp_path / "grow")
        loaded = not_hub.OrganModel.from_pretrained(tmp_path / "grow")
    assert loaded.config.growth == organ.config.growth and loaded.config.default_transplant["mode"] == "insert"
    blocks = make_blocks(split_documents(code_documents(), seed=0), tiny_tokenizer(), 32)
    not_hub.train_organ(loaded, model, blocks, method="in_situ", max_steps=3, lr=3e-3, progress=False)
    assert hash_state(model) == before  # in situ at its slot: the model itself is left as it was
    ids = tiny_input_ids()
    with torch.no_grad():
        untouched = model(ids).logits
        with loaded.transplanted(model):
            assert model.config.num_hidden_layers == 7
            assert not torch.equal(model(ids).logits, untouched)  # it learned: no longer the identity
