"""Behaviour beyond the per-family contract: config compatibility, Auto classes, refusals, multi-organ, rollback."""

import copy
import json
import warnings

import pytest
import torch
import warm_python
from tiny_models import tiny_input_ids, tiny_model
from torch.testing import assert_close
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
    T5Config,
    T5ForConditionalGeneration,
)

import not_hub
from not_hub import transplant as transplant_module
from not_hub.errors import (
    CheckpointFormatError,
    IncompatibleOrganError,
    InvalidLayerRangeError,
    InvalidModeError,
    NotHubError,
    OrganNotFoundError,
    TransplantStateError,
    UnknownConfigKeyWarning,
    UnsupportedArchitectureError,
)


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def saved_organ(llama, tmp_path):
    not_hub.extract_organ(llama, layer_range=(2, 4)).save_pretrained(tmp_path)
    return tmp_path


def test_default_layer_range_is_three_layers_from_a_third():
    model = tiny_model("llama", num_hidden_layers=30)
    organ = not_hub.extract_organ(model)
    assert organ.config.layer_range == (10, 13)
    assert len(organ.layers) == 3


@pytest.mark.parametrize("layer_range", [(4, 7), (3, 3), (-1, 2), (5, 4), "ab"])
def test_bad_layer_range_is_refused(llama, layer_range):
    with pytest.raises(InvalidLayerRangeError, match="layer_range"):
        not_hub.extract_organ(llama, layer_range=layer_range)


def test_config_records_donor_signature_and_hashes(llama):
    organ = not_hub.extract_organ(llama, layer_range=(2, 4), base_model="org/tiny-llama", revision="abc123")
    config = organ.config
    assert config.base_model == "org/tiny-llama" and config.base_model_revision == "abc123"
    assert config.donor_model_type == "llama" and config.donor_architectures == ["LlamaForCausalLM"]
    assert config.donor_num_hidden_layers == 6
    sig = config.signature
    assert (sig["hidden_size"], sig["num_attention_heads"], sig["num_key_value_heads"], sig["head_dim"]) == (
        32,
        4,
        2,
        8,
    )
    assert sig["intermediate_size"] == 64 and sig["activation"] == "silu" and sig["attention_bias"] is False
    assert sig["norm_type"] == ["LlamaRMSNorm"] and sig["norm_eps"] == llama.config.rms_norm_eps
    assert sig["decoder_layer_class"].endswith(":LlamaDecoderLayer")
    assert sig["rotary"]["rope_theta"] == llama.config.rope_parameters["rope_theta"]


def test_auto_classes_load_organs(saved_organ):
    config = AutoConfig.from_pretrained(saved_organ)
    assert isinstance(config, not_hub.OrganConfig)
    model = AutoModel.from_pretrained(saved_organ)
    assert isinstance(model, not_hub.OrganModel)
    assert sorted(model.config.tensor_sha256) == sorted(model.state_dict())


def test_unknown_config_keys_are_dropped_with_a_warning(saved_organ):
    path = saved_organ / "config.json"
    config = json.loads(path.read_text())
    config["organ_future_feature"] = {"x": 1}
    path.write_text(json.dumps(config))
    with pytest.warns(UnknownConfigKeyWarning, match="organ_future_feature"):
        organ = not_hub.OrganModel.from_pretrained(saved_organ, verify_integrity=False)
    assert not hasattr(organ.config, "organ_future_feature")


def test_newer_major_format_version_is_refused(saved_organ):
    path = saved_organ / "config.json"
    config = json.loads(path.read_text())
    config["format_version"] = "2.0"
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match="format_version='2.0'.*upgrade"):
        not_hub.OrganModel.from_pretrained(saved_organ, verify_integrity=False)


def test_newer_minor_format_version_loads(saved_organ):
    path = saved_organ / "config.json"
    config = json.loads(path.read_text())
    config["format_version"] = "1.7"
    path.write_text(json.dumps(config))
    organ = not_hub.OrganModel.from_pretrained(saved_organ, verify_integrity=False)
    assert organ.config.format_version == "1.7"


def test_missing_or_unexpected_tensors_are_refused(llama, saved_organ):
    from safetensors.torch import load_file, save_file

    path = saved_organ / "model.safetensors"
    tensors = load_file(path)
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match="missing"):
        not_hub.OrganModel.from_pretrained(saved_organ)


def test_non_organ_checkpoint_is_refused(llama, tmp_path):
    llama.save_pretrained(tmp_path)
    with pytest.raises(CheckpointFormatError, match="model_type='llama'"):
        not_hub.OrganModel.from_pretrained(tmp_path)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(OrganNotFoundError) as info:
        not_hub.OrganModel.from_pretrained(tmp_path / "nope" / "deeper")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, NotHubError)


def test_hand_written_card_is_kept_unless_asked(llama, tmp_path):
    organ = not_hub.extract_organ(llama, layer_range=(2, 4))
    (tmp_path / "README.md").write_text("# my own card\n")
    organ.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my own card\n"
    organ.save_pretrained(tmp_path, overwrite_card=True)
    assert "layers [2, 4)" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(hidden_size=64), "hidden_size"),
        (dict(num_attention_heads=8), "num_attention_heads"),
        (dict(num_key_value_heads=4), "num_key_value_heads"),
        (dict(intermediate_size=96), "intermediate_size"),
        (dict(hidden_act="gelu"), "activation"),
        (dict(rms_norm_eps=1e-3), "norm_eps"),
        (dict(rope_parameters={"rope_theta": 5.0, "rope_type": "default"}), "rotary"),
    ],
)
def test_incompatible_recipient_names_the_field_and_is_unchanged(llama, hash_state, overrides, field):
    organ = not_hub.extract_organ(llama, layer_range=(2, 4))
    recipient = tiny_model("llama", **overrides)
    report = organ.check_compatibility(recipient)
    assert [row.field for row in report.blocking if row.field == field] == [field]
    before = hash_state(recipient)
    with pytest.raises(IncompatibleOrganError, match=field):
        organ.transplant_into(recipient, position=0)
    assert hash_state(recipient) == before


def test_compatibility_report_lists_every_field(llama):
    organ = not_hub.extract_organ(llama, layer_range=(2, 4))
    report = organ.check_compatibility(tiny_model("llama", num_hidden_layers=4, vocab_size=256))
    fields = {row.field: row for row in report.rows}
    for name in (
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "norm_type",
        "norm_eps",
        "activation",
        "rotary",
        "attention_bias",
        "decoder_layer_class",
    ):
        assert fields[name].matches and not fields[name].blocking
    assert fields["num_hidden_layers"].donor == 6 and fields["num_hidden_layers"].recipient == 4
    assert report.compatible  # depth and vocabulary never block
    assert "=> compatible" in str(report)


def test_encoder_models_are_refused():
    bert = BertForMaskedLM(
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64)
    )
    with pytest.raises(UnsupportedArchitectureError, match="encoder-only"):
        not_hub.extract_organ(bert, layer_range=(0, 1))
    t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="encoder-decoder"):
        not_hub.extract_organ(t5, layer_range=(0, 1))


def test_bare_base_model_is_refused_with_the_fix(llama):
    with pytest.raises(UnsupportedArchitectureError, match="AutoModelForCausalLM"):
        not_hub.extract_organ(llama.model, layer_range=(0, 1))


def test_family_without_a_file_is_discovered_and_flagged(tmp_path):
    assert "starcoder2" not in not_hub.SUPPORTED_MODEL_TYPES
    config = AutoConfig.for_model(
        "starcoder2",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    donor = AutoModelForCausalLM.from_config(config).eval()
    ids = tiny_input_ids()
    expected = donor(ids).logits
    organ = not_hub.extract_organ(donor, layer_range=(1, 3))
    assert organ.config.architecture["inferred"] is True
    assert organ.config.architecture["layers"] == "model.layers"
    organ.save_pretrained(tmp_path)
    organ = not_hub.OrganModel.from_pretrained(tmp_path)
    recipient = copy.deepcopy(donor)
    organ.transplant_into(recipient, position=1)
    assert_close(recipient(ids).logits, expected)


def test_bad_mode_is_refused(llama):
    organ = not_hub.extract_organ(llama, layer_range=(2, 4))
    with pytest.raises(InvalidModeError, match="mode='graft'"):
        organ.transplant_into(llama, position=0, mode="graft")


def test_several_organs_and_explant_in_any_order(llama, hash_state):
    before = hash_state(llama)
    ids = tiny_input_ids()
    a = not_hub.extract_organ(llama, layer_range=(0, 2))
    b = not_hub.extract_organ(tiny_model("llama", seed=3), layer_range=(3, 5))
    ta = a.transplant_into(llama, position=4, mode="insert")  # occupies [4, 6) of 8
    tb = b.transplant_into(llama, position=0, mode="insert")  # occupies [0, 2) of 10, shifts a to [6, 8)
    assert ta.layer_indices == [6, 7] and tb.layer_indices == [0, 1]
    assert [r["position"] for r in llama.config.transplants] == [4, 0]
    assert llama.config.num_hidden_layers == 10
    with_cache = llama.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(with_cache, llama.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=False))
    assert not_hub.transplants_of(llama) == [ta, tb]
    ta.explant()
    assert tb.layer_indices == [0, 1] and llama.config.num_hidden_layers == 8
    tb.explant()
    assert hash_state(llama) == before
    with pytest.raises(TransplantStateError, match="already explanted"):
        tb.explant()


def test_failure_mid_transplant_rolls_back(llama, hash_state, monkeypatch):
    before = hash_state(llama)
    layers_before = list(llama.model.layers)
    organ = not_hub.extract_organ(llama, layer_range=(2, 4))

    def explode(stack):
        raise RuntimeError("simulated failure while rewiring")

    monkeypatch.setattr(transplant_module, "renumber_layer_idx", explode)
    with pytest.raises(RuntimeError, match="simulated"):
        organ.transplant_into(llama, position=1, mode="insert")
    monkeypatch.undo()
    assert list(llama.model.layers) == layers_before
    assert hash_state(llama) == before
    assert not_hub.transplants_of(llama) == []


def test_transplant_casts_to_recipient_dtype(llama):
    organ = not_hub.extract_organ(llama, layer_range=(2, 4))
    recipient = tiny_model("llama").to(torch.bfloat16)
    record = organ.transplant_into(recipient, position=0)
    assert {p.dtype for layer in record.layers for p in layer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in organ.parameters()} == {torch.float32}  # the organ itself is untouched


def test_device_mapped_recipient_keeps_working(llama, tmp_path):
    llama.save_pretrained(tmp_path)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    recipient = AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map=device_map, attn_implementation="eager"
    ).eval()
    ids = tiny_input_ids()
    expected = recipient(ids).logits
    organ = not_hub.extract_organ(recipient, layer_range=(2, 4))
    record = organ.transplant_into(recipient, position=2)
    assert_close(recipient(ids).logits, expected)
    record.explant()
    assert torch.equal(recipient(ids).logits, expected)


def test_transplant_record_in_config(llama, saved_organ):
    organ = not_hub.OrganModel.from_pretrained(saved_organ)
    organ.transplant_into(llama, position=1, mode="insert")
    (record,) = llama.config.transplants
    assert record["organ"] == str(saved_organ)
    assert record["position"] == 1 and record["mode"] == "insert" and record["donor_layer_range"] == [2, 4]


def test_errors_are_also_builtins():
    from not_hub import errors

    for name in (
        "UnsupportedArchitectureError",
        "InvalidLayerRangeError",
        "InvalidPositionError",
        "IncompatibleOrganError",
        "CheckpointFormatError",
        "IntegrityError",
    ):
        assert issubclass(getattr(errors, name), ValueError) and issubclass(getattr(errors, name), NotHubError)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert issubclass(errors.UnknownConfigKeyWarning, UserWarning)


def test_transplanted_checkpoint_loads_in_a_process_without_not_hub(llama, tmp_path):
    """The saved recipient is a plain transformers checkpoint: a fresh process that never imports not_hub loads it."""
    import sys

    from safetensors.torch import save_file

    ids = tiny_input_ids()
    organ = not_hub.extract_organ(tiny_model("llama", seed=5), layer_range=(1, 3))
    organ.transplant_into(llama, position=3, mode="insert")
    llama.save_pretrained(tmp_path / "model")
    save_file({"ids": ids, "logits": llama(ids).logits.detach()}, tmp_path / "expected.safetensors")
    script = (
        "import sys, torch; from safetensors.torch import load_file; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}, attn_implementation='eager')\n"
        f"e = load_file({str(tmp_path / 'expected.safetensors')!r})\n"
        "assert 'not_hub' not in sys.modules\n"
        "torch.testing.assert_close(m.eval()(e['ids']).logits, e['logits'], rtol=0, atol=0)\n"
        "print(m.config.num_hidden_layers, m.config.transplants[0]['position'])\n"
    )
    out = warm_python.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["8", "3"]
