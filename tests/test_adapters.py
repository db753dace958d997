"""peft adapters trained on a transplanted model record the transplant; loading one onto a model without it fails."""

import json

import pytest
import torch
from hub_server import LocalHub
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from test_hub import run_scenario
from tiny_models import tiny_input_ids, tiny_model

import not_hub
from not_hub.adapters import RECORD_FILE, TRANSPLANT_TAG
from not_hub.errors import IncompatibleAdapterError, InvalidArgumentError

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)


def _organ():
    return not_hub.extract_organ(tiny_model("llama", seed=3), layer_range=(1, 3), base_model="org/donor")


def _adapter_on_transplant(tmp_path, mode, position):
    """An adapter trained (randomly initialised: init_lora_weights=False) on a transplanted recipient, saved."""
    recipient = tiny_model("llama")
    organ = _organ()
    organ.save_pretrained(tmp_path / "organ")
    organ = not_hub.OrganModel.from_pretrained(tmp_path / "organ")
    organ.transplant_into(recipient, position=position, mode=mode)
    torch.manual_seed(0)
    peft_model = get_peft_model(recipient, LoraConfig(**LORA))
    with torch.no_grad():
        logits = peft_model(tiny_input_ids()).logits
    not_hub.save_adapter(peft_model, tmp_path / "adapter")
    return organ, logits


@pytest.mark.parametrize("mode, position, depth", [("insert", 2, 8), ("replace", 2, 6)])
def test_an_adapter_on_a_transplant_is_refused_by_a_model_without_the_organ(tmp_path, mode, position, depth):
    organ, logits = _adapter_on_transplant(tmp_path, mode, position)
    record = json.loads((tmp_path / "adapter" / RECORD_FILE).read_text())
    assert record["num_hidden_layers"] == depth and record["transplants"][0]["mode"] == mode
    assert record["transplants"][0]["organ"] == str(tmp_path / "organ")
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert TRANSPLANT_TAG in card.data.tags and "peft" == card.data.library_name and "## Transplant" in card.text
    assert f"position={position}, mode={mode!r}" in card.text

    plain = tiny_model("llama")
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(IncompatibleAdapterError, match=r"organ .* \(" + mode + r" at position 2\).*no transplant"):
        not_hub.load_adapter(plain, tmp_path / "adapter")
    assert not any("lora_" in name for name, _ in plain.named_modules())  # nothing wrapped
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())

    elsewhere = tiny_model("llama")  # the right organ at the wrong position is refused too
    organ.transplant_into(elsewhere, position=position + 1, mode=mode)
    with pytest.raises(IncompatibleAdapterError, match=f"at position {position + 1}"):
        not_hub.load_adapter(elsewhere, tmp_path / "adapter")

    fresh = tiny_model("llama")
    organ.transplant_into(fresh, position=position, mode=mode)
    loaded = not_hub.load_adapter(fresh, tmp_path / "adapter")
    assert isinstance(loaded, PeftModel)
    with torch.no_grad():
        assert torch.equal(loaded(tiny_input_ids()).logits, logits)


def test_plain_adapters_are_checked_by_their_layers(tmp_path):
    # A plain peft save (no record) of an adapter trained on an 8-layer transplant: refused by the 6-layer model.
    recipient = tiny_model("llama")
    _organ().transplant_into(recipient, position=2, mode="insert")
    get_peft_model(recipient, LoraConfig(**LORA)).save_pretrained(tmp_path / "deep")
    with pytest.raises(IncompatibleAdapterError, match="weights for layer 7, this model has 6 layers"):
        not_hub.load_adapter(tiny_model("llama"), tmp_path / "deep")
    # An adapter of the untouched model loads onto the untouched model as peft would.
    get_peft_model(tiny_model("llama"), LoraConfig(**LORA)).save_pretrained(tmp_path / "flat")
    assert isinstance(not_hub.load_adapter(tiny_model("llama"), tmp_path / "flat"), PeftModel)
    # save_adapter refuses what is not a PeftModel, and writes nothing.
    with pytest.raises(InvalidArgumentError, match="PeftModel"):
        not_hub.save_adapter(tiny_model("llama"), tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_saving_an_adapter_again_keeps_a_hand_written_card(tmp_path):
    recipient = tiny_model("llama")
    _organ().transplant_into(recipient, position=2, mode="insert")
    peft_model = get_peft_model(recipient, LoraConfig(**LORA))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "README.md").write_text("---\nlicense: mit\ntags:\n- mine\n---\n\nMy notes.\n")
    not_hub.save_adapter(peft_model, tmp_path / "adapter")
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.license == "mit" and "My notes." in card.text  # the user's card, merged into
    assert {"mine", TRANSPLANT_TAG} <= set(card.data.tags) and "## Transplant" in card.text


def test_adapter_on_a_transplant_by_repo_id(tmp_path):
    hub = LocalHub().start()
    try:
        run_scenario(
            hub,
            tmp_path,
            """
            from huggingface_hub import HfApi, ModelCard
            from peft import LoraConfig, get_peft_model
            from not_hub.errors import IncompatibleAdapterError
            organ = not_hub.extract_organ(tiny_model("llama", seed=3), layer_range=(1, 3), base_model="org/donor")
            organ.push_to_hub("user/organ")
            organ = not_hub.OrganModel.from_pretrained("user/organ")
            recipient = tiny_model("llama")
            organ.transplant_into(recipient, position=2, mode="insert")
            peft_model = get_peft_model(recipient, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
            HfApi().create_repo("user/adapter")
            HfApi().upload_file(path_or_fileobj=b"---\\nlicense: mit\\n---\\n# Mine\\nKept.\\n",
                                path_in_repo="README.md", repo_id="user/adapter")
            not_hub.push_adapter(peft_model, "user/adapter")
            card = ModelCard.load("user/adapter")
            assert "Kept." in card.text and card.data.license == "mit" and "not_hub-transplant" in card.data.tags
            assert "OrganModel.from_pretrained('user/organ')" in card.text, card.text
            try:
                not_hub.load_adapter(tiny_model("llama"), "user/adapter")
                raise SystemExit("adapter of a transplant loaded onto the untouched model")
            except IncompatibleAdapterError as err:
                assert "user/organ" in str(err), err
            fresh = tiny_model("llama")
            not_hub.OrganModel.from_pretrained("user/organ").transplant_into(fresh, position=2, mode="insert")
            not_hub.load_adapter(fresh, "user/adapter")
            # a plain peft adapter on the Hub (no record): checked by its layers, loads onto the untouched model
            get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"])).push_to_hub("user/plain")
            not_hub.load_adapter(tiny_model("llama"), "user/plain")
            print("ok")
            """,
        )
    finally:
        hub.stop()


def test_a_malformed_or_hostile_record_is_never_trusted_over_the_weights(tmp_path):
    _adapter_on_transplant(tmp_path, "insert", 2)  # weights for 8 layers (the organ inserted 2 deeper)
    record_path = tmp_path / "adapter" / RECORD_FILE
    for text in ["{not json", '["a list"]', '{"num_hidden_layers": "8", "transplants": []}']:
        record_path.write_text(text)
        with pytest.raises(not_hub.errors.CheckpointFormatError, match=RECORD_FILE):
            not_hub.check_adapter(tiny_model("llama"), tmp_path / "adapter")
    # A record that claims no transplant on a 6-layer model, while the weights reach layer 7.
    record_path.write_text(json.dumps({"recipient": None, "num_hidden_layers": 6, "transplants": []}))
    with pytest.raises(IncompatibleAdapterError, match="inconsistent: its record says 6 layers but its weights reach"):
        not_hub.load_adapter(tiny_model("llama"), tmp_path / "adapter")


def test_the_record_tells_two_organs_with_one_name_apart_by_their_weights(tmp_path):
    organ, _ = _adapter_on_transplant(tmp_path, "replace", 2)
    retrained = not_hub.OrganModel.from_pretrained(tmp_path / "organ")
    with torch.no_grad():
        retrained.layers[0].mlp.down_proj.weight.add_(0.01)  # same path, same revision, other weights
    model = tiny_model("llama")
    retrained.transplant_into(model, position=2, mode="replace")
    with pytest.raises(IncompatibleAdapterError, match="Graft the same organs first"):
        not_hub.load_adapter(model, tmp_path / "adapter")
    same = tiny_model("llama")
    organ.transplant_into(same, position=2, mode="replace")
    not_hub.check_adapter(same, tmp_path / "adapter")  # the organ it was trained on passes


def test_a_plain_adapter_from_a_shallower_model_is_said_to_be_one(tmp_path, caplog):
    pruned = tiny_model("llama")
    not_hub.excise(pruned, (4, 6))  # 4 layers left
    peft_model = get_peft_model(pruned, LoraConfig(**LORA))
    peft_model.save_pretrained(tmp_path / "plain")  # plain peft: no record
    with caplog.at_level("WARNING", logger="not_hub.adapters"):
        not_hub.check_adapter(tiny_model("llama"), tmp_path / "plain")
    assert "layers up to 3 only, and this model has 6 layers" in caplog.text
