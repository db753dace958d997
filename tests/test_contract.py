"""The organ contract, run over every registered family on tiny models built from configs."""

import copy
import json
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, tiny_input_ids, tiny_model
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

import not_hub
from not_hub.errors import IncompatibleOrganError, IntegrityError, InvalidPositionError
from not_hub.probes import capture_layer_inputs

RANGE = (1, 3)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def donor(family):
    return tiny_model(family)


def test_identity_transplant_reproduces_donor_logits(donor):
    ids = tiny_input_ids()
    expected = donor(ids).logits
    organ = not_hub.extract_organ(donor, layer_range=RANGE)
    recipient = copy.deepcopy(donor)
    organ.transplant_into(recipient, position=RANGE[0])
    assert_close(recipient(ids).logits, expected)


def test_organ_on_donor_hidden_state_reproduces_next_hidden_state(donor):
    ids = tiny_input_ids()
    organ = not_hub.extract_organ(donor, layer_range=RANGE)
    hidden_in, layer_inputs = capture_layer_inputs(donor, RANGE, ids)
    hidden_out, _ = capture_layer_inputs(donor, (RANGE[1], RANGE[1] + 1), ids)
    # The organ's layers read the donor's runtime config (attention implementation), as in a transplant.
    for layer in organ.layers:
        not_hub.architectures.point_layer_config(layer, donor.config)
    assert_close(organ(hidden_in, layer_inputs=layer_inputs), hidden_out)


def test_extraction_leaves_donor_untouched_and_copies(donor, hash_state):
    before = hash_state(donor)
    organ = not_hub.extract_organ(donor, layer_range=RANGE)
    assert hash_state(donor) == before
    donor_ptrs = {p.data_ptr() for p in donor.parameters()}
    assert not donor_ptrs & {p.data_ptr() for p in organ.parameters()}
    assert organ.config.layer_range == RANGE
    assert organ.config.donor_model_type == donor.config.model_type


def test_save_load_is_bit_exact_with_exactly_three_files(donor, tmp_path):
    organ = not_hub.extract_organ(donor, layer_range=RANGE)
    organ.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = not_hub.OrganModel.from_pretrained(tmp_path)
    original, reloaded = organ.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    for name in original:
        assert original[name].dtype == reloaded[name].dtype
        assert torch.equal(original[name], reloaded[name]), name
    assert loaded.config.signature == organ.config.signature


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # last byte belongs to the last tensor's data, not the header
    path.write_bytes(bytes(data))


def test_flipped_weight_byte_is_detected(donor, tmp_path):
    not_hub.extract_organ(donor, layer_range=RANGE).save_pretrained(tmp_path)
    _flip_last_byte(tmp_path / "model.safetensors")
    with pytest.raises(IntegrityError, match="does not match its recorded sha256"):
        not_hub.OrganModel.from_pretrained(tmp_path)


def test_edited_config_is_detected(donor, tmp_path):
    not_hub.extract_organ(donor, layer_range=RANGE).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["layer_range"] = [0, 2]
    path.write_text(json.dumps(config, indent=2))
    with pytest.raises(IntegrityError, match="edited after saving"):
        not_hub.OrganModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("mode,position", [("replace", 0), ("insert", 2)])
def test_generate_with_cache_equals_without_after_transplant(donor, mode, position, hash_state):
    before = hash_state(donor)
    organ = not_hub.extract_organ(donor, layer_range=RANGE)
    record = organ.transplant_into(donor, position=position, mode=mode)
    k = RANGE[1] - RANGE[0]
    depth = donor.config.num_hidden_layers
    assert record.layer_indices == list(range(position, position + k))
    ids = tiny_input_ids(batch=1, length=6)
    with_cache = donor.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    without_cache = donor.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without_cache)
    record.explant()
    assert donor.config.num_hidden_layers == (depth - k if mode == "insert" else depth)
    assert hash_state(donor) == before


@pytest.mark.parametrize("mode", ["replace", "insert"])
def test_transplanted_recipient_reloads_with_plain_transformers(donor, mode, tmp_path):
    # 12 tokens > the tiny sliding windows (8): a layer of the wrong attention kind would change the logits.
    ids = tiny_input_ids(length=12)
    organ = not_hub.extract_organ(donor, layer_range=RANGE)
    organ.transplant_into(donor, position=0, mode=mode)
    expected = donor(ids).logits
    donor.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert reloaded.config.transplants[0]["mode"] == mode
    assert reloaded.config.num_hidden_layers == donor.config.num_hidden_layers
    assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)


def test_out_of_range_positions_leave_recipient_unchanged(donor, hash_state):
    organ = not_hub.extract_organ(donor, layer_range=RANGE)
    depth = donor.config.num_hidden_layers
    before = hash_state(donor)
    with pytest.raises(InvalidPositionError, match=rf"expected 0 <= position <= {depth - 2}"):
        organ.transplant_into(donor, position=depth - 1, mode="replace")
    with pytest.raises(InvalidPositionError, match=rf"expected 0 <= position <= {depth}"):
        organ.transplant_into(donor, position=depth + 1, mode="insert")
    with pytest.raises(InvalidPositionError):
        organ.transplant_into(donor, position=-1)
    assert hash_state(donor) == before
    assert not hasattr(donor.config, "transplants")


def test_overlapping_organs_are_refused(donor, hash_state):
    organ = not_hub.extract_organ(donor, layer_range=RANGE)
    organ.transplant_into(donor, position=0)
    before = hash_state(donor)
    with pytest.raises(InvalidPositionError, match=r"overlaps the organ already transplanted at layers \[0, 2\)"):
        organ.transplant_into(donor, position=1)
    with pytest.raises(InvalidPositionError, match="overlaps"):
        organ.transplant_into(donor, position=1, mode="insert")
    assert hash_state(donor) == before


def test_incompatible_family_is_refused(family, hash_state):
    other = "qwen2" if family != "qwen2" else "llama"
    organ = not_hub.extract_organ(tiny_model(other), layer_range=RANGE)
    recipient = tiny_model(family)
    before = hash_state(recipient)
    with pytest.raises(IncompatibleOrganError, match="decoder_layer_class") as info:
        organ.transplant_into(recipient, position=0)
    assert not info.value.report.compatible
    assert hash_state(recipient) == before


def _kind(layer) -> tuple:
    """What a layer is: its class, and the per-layer choices families make at build time (attention kind, sliding
    window), wherever the family keeps them."""
    attn = next((m for name, m in layer.named_modules() if name.endswith(("attn", "attention"))), None)
    return (
        type(layer).__name__,
        getattr(layer, "attention_type", None),
        getattr(attn, "sliding_window", None) if attn is not None else None,
        getattr(attn, "is_sliding", None) if attn is not None else None,
    )


def test_organ_keeps_its_donor_layer_kinds(donor):
    """Moved layers keep their kind (class, sliding/full attention); the recipient's per-layer config lists follow
    them, and every layer's KV-cache slot is its new index. Asserted for every family."""
    spec = not_hub.resolve_architecture(donor)
    source = [_kind(donor.get_submodule(spec.layers)[i]) for i in range(*RANGE)]
    organ = not_hub.extract_organ(donor, layer_range=RANGE)
    depth = donor.config.num_hidden_layers
    lists = {
        n: list(getattr(donor.config, n))
        for n in spec.per_layer_config
        if isinstance(getattr(donor.config, n, None), list)
    }
    with organ.transplanted(donor, position=0, mode="insert"):
        stack = donor.get_submodule(spec.layers)
        assert [_kind(layer) for layer in stack[:2]] == source
        assert donor.config.num_hidden_layers == len(stack) == depth + 2
        for name, values in lists.items():
            assert getattr(donor.config, name) == values[RANGE[0] : RANGE[1]] + values
        slots = [
            [m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)] for layer in stack
        ]
        assert all(slot and set(slot) == {i} for i, slot in enumerate(slots)), slots


def test_architecture_file_points_at_real_modules(donor):
    """Each family's data file names modules that exist: embeddings, final norm, LM head, rotary embedding."""
    from not_hub.architectures import optional_submodule

    spec = not_hub.resolve_architecture(donor)
    assert not spec.inferred
    stack = donor.get_submodule(spec.layers)
    assert len(stack) == donor.config.num_hidden_layers
    assert donor.get_submodule(spec.embeddings[0]) is donor.get_input_embeddings()
    assert donor.get_submodule(spec.lm_head) is donor.get_output_embeddings()
    assert "norm" in type(donor.get_submodule(spec.final_norm)).__name__.lower()
    if spec.rotary_emb is not None:
        assert "rotary" in type(donor.get_submodule(spec.rotary_emb)).__name__.lower()
    for path in spec.embeddings[1:] + spec.head_extras:
        optional_submodule(donor, path)  # optional parts may be absent, but a path must not be malformed


def test_an_untrained_growth_organ_changes_nothing(donor, hash_state):
    """Growth (LLaMA-Pro): copies of layers with their output projections zeroed, inserted; the grown model computes
    bit for bit what the original did, with and without the KV cache, and explant restores it."""
    before = hash_state(donor)
    ids = tiny_input_ids(batch=1, length=6)
    with torch.no_grad():
        logits = donor(ids).logits
    generated = donor.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    organ = not_hub.grow_organ(donor, position=3, num_layers=2)
    assert hash_state(donor) == before  # the organ holds copies
    assert organ.config.default_transplant == {"mode": "insert", "position": 3} and organ.config.growth["zeroed"]
    with organ.transplanted(donor) as transplant:
        assert transplant.mode == "insert" and transplant.layer_indices == [3, 4]
        with torch.no_grad():
            assert torch.equal(donor(ids).logits, logits)
        assert torch.equal(donor.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True), generated)
        assert torch.equal(donor.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False), generated)
    assert hash_state(donor) == before
