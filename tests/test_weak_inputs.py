"""Reliability round three, the weak handling: odd config values, load arguments, file-system faults, Hub answers,
lifecycle corners, adapters, training and data, the Space engine. Each case was a raw traceback, a silent
reinterpretation or a leftover; each is now a named `not_hub.errors` class (also its builtin) or a refusal.
"""

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
import warm_python
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model
from tiny_tokenizer import code_documents, tiny_tokenizer

import not_hub
import not_hub.modeling_organ
import not_hub.trainer
from not_hub.errors import (
    CheckpointFormatError,
    InvalidArgumentError,
    OrganNotFoundError,
    UnexpectedArgumentError,
)


@pytest.fixture(scope="module")
def saved_organ(tmp_path_factory):
    folder = tmp_path_factory.mktemp("organ") / "organ"
    not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3)).save_pretrained(folder)
    return folder


def _copy(saved_organ, tmp_path, *, config=None, tensors=None) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(saved_organ, folder)
    if config is not None:
        raw = json.loads((folder / "config.json").read_text())
        config(raw)
        (folder / "config.json").write_text(json.dumps(raw))
    if tensors is not None:
        state = load_file(folder / "model.safetensors")
        tensors(state)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _set(key, value):
    return lambda raw: raw.__setitem__(key, value)


CONFIG_CASES = {
    "negative start": ("layer_range", _set("layer_range", [-1, 1])),
    "bool start": ("layer_range", _set("layer_range", [True, 3])),
    "float range": ("layer_range", _set("layer_range", [1.0, 3.0])),
    "three numbers": ("layer_range", _set("layer_range", [1, 2, 3])),
    "string range": ("layer_range", _set("layer_range", "1,3")),
    "empty organ": ("layer_range", _set("layer_range", [2, 2])),
    "negative format": ("format_version", _set("format_version", "-3.0")),
    "signature list": ("signature", _set("signature", [1, 2])),
    "donor_config string": ("donor_config", _set("donor_config", "llama")),
    "layer_sources string": ("layer_sources", _set("layer_sources", "organ")),
    "layer_sources without index": ("layer_sources", _set("layer_sources", [{"role": "organ"}, {"role": "organ"}])),
    "default_transplant string": ("default_transplant", _set("default_transplant", "replace")),
    "default_transplant excise": ("default_transplant", _set("default_transplant", {"mode": "excise", "position": 1})),
    "tensor_sha256 list": ("tensor_sha256", _set("tensor_sha256", [])),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_values_of_the_wrong_type_or_range_are_named_format_errors(case, saved_organ, tmp_path):
    field, edit = CONFIG_CASES[case]
    folder = _copy(saved_organ, tmp_path, config=edit)
    with pytest.raises(CheckpointFormatError, match=f"{field}="):
        not_hub.OrganModel.from_pretrained(folder, verify_integrity=False)


def test_a_config_nested_too_deeply_is_a_format_error(saved_organ, tmp_path):
    folder = _copy(saved_organ, tmp_path)
    raw = (folder / "config.json").read_text().rstrip().removesuffix("}")
    (folder / "config.json").write_text(raw + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointFormatError, match="nests JSON too deeply"):
        not_hub.OrganModel.from_pretrained(folder, verify_integrity=False)


def _first(state, change):
    key = sorted(state)[0]
    state[key] = change(state[key])


@pytest.mark.parametrize(
    "change",
    [lambda t: (t * 1000).to(torch.int64), lambda t: t.half()],
    ids=["int64 tensor", "one fp16 tensor"],
)
def test_tensors_of_another_dtype_are_refused_not_cast(change, saved_organ, tmp_path):
    folder = _copy(saved_organ, tmp_path, tensors=lambda state: _first(state, change))
    with pytest.raises(CheckpointFormatError, match="mixes dtypes or holds non-floating"):
        not_hub.OrganModel.from_pretrained(folder, verify_integrity=False)


def test_a_tensor_of_the_wrong_shape_is_a_format_error(saved_organ, tmp_path):
    folder = _copy(saved_organ, tmp_path, tensors=lambda state: _first(state, lambda t: torch.zeros(3, 3)))
    with pytest.raises(CheckpointFormatError, match="does not fit"):
        not_hub.OrganModel.from_pretrained(folder, verify_integrity=False)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"device_map": "meta"}, UnexpectedArgumentError, "without its weights"),
        ({"dtype": "int8"}, InvalidArgumentError, "not a floating dtype"),
        ({"dtype": torch.int64}, InvalidArgumentError, "not a floating dtype"),
        ({"device_map": "cuda:7"}, InvalidArgumentError, "no such device"),
    ],
    ids=["meta", "int8 name", "int64 dtype", "missing device"],
)
def test_load_arguments_that_would_drop_or_misplace_weights_are_refused(kwargs, error, words, saved_organ):
    if kwargs.get("device_map") == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(error, match=words):
        not_hub.OrganModel.from_pretrained(saved_organ, **kwargs)


def test_an_empty_name_never_loads_the_current_folder(saved_organ, monkeypatch):
    monkeypatch.chdir(saved_organ)  # an organ sits right here
    with pytest.raises(OrganNotFoundError, match="empty"):
        not_hub.OrganModel.from_pretrained("")


# ----------------------------------------------------------------------------------------------------- lifecycle


def test_explanted_layers_follow_the_model_as_it_is_now():
    model = tiny_model("llama")
    organ = not_hub.extract_organ(tiny_model("llama", seed=3), layer_range=(1, 3))
    transplant = organ.transplant_into(model, position=1)
    model.train()
    model.requires_grad_(False)
    transplant.explant()
    restored = model.model.layers[1:3]
    assert all(m.training for layer in restored for m in layer.modules())
    assert not any(p.requires_grad for p in restored.parameters())


def test_organ_layers_are_checkpointed_when_the_recipient_is():
    model = tiny_model("llama")
    model.gradient_checkpointing_enable()
    organ = not_hub.extract_organ(tiny_model("llama", seed=3), layer_range=(1, 3))
    transplant = organ.transplant_into(model, position=1, mode="insert")
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True] * 8
    model.gradient_checkpointing_disable()
    transplant.explant()
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [False] * 6


def test_trained_bridges_are_never_silently_left_out(hash_state):
    organ = not_hub.extract_organ(tiny_model("llama", seed=3), layer_range=(1, 3))
    organ.add_bridges()
    recipient = tiny_model("llama")
    organ.transplant_into(recipient, position=1).explant()  # untrained (identity) bridges change nothing: allowed
    with torch.no_grad():
        organ.bridge_in.weight.mul_(1.1)
    before = hash_state(recipient)
    with pytest.raises(not_hub.errors.InvalidModeError, match="trained bridges"):
        organ.transplant_into(recipient, position=1, mode="replace")
    assert hash_state(recipient) == before
    organ.transplant_into(recipient, position=1, mode="bridge").explant()


def test_excise_is_not_a_transplant_mode(hash_state):
    organ = not_hub.extract_organ(tiny_model("llama", seed=3), layer_range=(1, 3))
    recipient = tiny_model("llama")
    before = hash_state(recipient)
    with pytest.raises(not_hub.errors.InvalidModeError, match="not_hub.excise"):
        organ.transplant_into(recipient, position=1, mode="excise", remove=2)
    assert hash_state(recipient) == before


# ------------------------------------------------------------------------------------------------ training, data


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"], ids=["not json", "a list"])
def test_a_corrupted_run_identity_is_a_named_error(content, tmp_path):
    blocks = not_hub.make_blocks(not_hub.split_documents(code_documents(60), seed=0), tiny_tokenizer(), 32)
    donor = tiny_model("llama")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    not_hub.train_organ(organ, donor, blocks, max_steps=1, output_dir=tmp_path, progress=False)
    (tmp_path / "run_identity.json").write_text(content)
    with pytest.raises(CheckpointFormatError, match="run_identity.json"):
        not_hub.train_organ(organ, donor, blocks, max_steps=1, output_dir=tmp_path, progress=False)


def test_token_ids_past_the_vocabulary_are_a_data_error():
    model = tiny_model("llama")
    with pytest.raises(not_hub.errors.DataError, match="token id 500, outside the model's vocabulary"):
        not_hub.perplexity(model, [[1, 2, 3], [1, 2, 500, 3]])
    with pytest.raises(not_hub.errors.DataError, match="token id -1"):
        not_hub.perplexity(model, [[1, -1, 3]])


# ------------------------------------------------------------------------------------------- file-system faults


def test_saving_under_a_file_or_to_an_empty_path_is_an_output_path_error(tmp_path):
    organ = not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(not_hub.errors.OutputPathError, match="exists and is not a folder"):
        organ.save_pretrained(tmp_path / "a-file" / "organ")
    with pytest.raises(not_hub.errors.OutputPathError, match="empty"):
        organ.save_pretrained("")


def test_a_full_disk_during_save_keeps_the_previous_organ_and_leaves_nothing_behind(tmp_path, monkeypatch):
    old = not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3))
    old.save_pretrained(tmp_path / "organ")
    before = {p.name: p.read_bytes() for p in (tmp_path / "organ").iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))

    monkeypatch.setattr(not_hub.modeling_organ, "save_file", full)
    new = not_hub.extract_organ(tiny_model("llama", seed=5), layer_range=(1, 3))
    with pytest.raises(not_hub.errors.OutputPathError, match="the disk is full"):
        new.save_pretrained(tmp_path / "organ")
    assert {p.name: p.read_bytes() for p in (tmp_path / "organ").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["organ"]  # no temporary folder left


def test_a_run_dir_that_is_a_file_or_cannot_hold_a_checkpoint_is_named(tmp_path, monkeypatch):
    blocks = not_hub.make_blocks(not_hub.split_documents(code_documents(60), seed=0), tiny_tokenizer(), 32)
    donor = tiny_model("llama")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    (tmp_path / "run-file").write_text("x")
    with pytest.raises(not_hub.errors.OutputPathError, match="is an existing file"):
        not_hub.train_organ(organ, donor, blocks, max_steps=2, output_dir=tmp_path / "run-file", progress=False)

    real_save = not_hub.trainer.save_file
    calls = []

    def full_on_the_second_checkpoint(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(not_hub.trainer, "save_file", full_on_the_second_checkpoint)
    run = tmp_path / "run"
    with pytest.raises(not_hub.errors.OutputPathError, match="the disk is full"):
        not_hub.train_organ(organ, donor, blocks, max_steps=4, save_every=1, output_dir=run, progress=False)
    left = sorted(p.name for p in run.glob("checkpoint-*"))
    assert left and all((run / name / "not_hub_state.json").is_file() for name in left)  # no partial checkpoint


def test_a_long_one_line_document_is_tokenised_in_pieces_with_the_same_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from not_hub.data import _PIECE_CHARS, _with_eos

    words = [f"w{i}" for i in range(50)]
    vocab = {w: i for i, w in enumerate(words)} | {"<unk>": 50, "<eos>": 51}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    text = " ".join(words[i % 50] for i in range(3 * _PIECE_CHARS // 3))  # ~200K characters on one line
    assert len(text) > 2 * _PIECE_CHARS
    for tokenizer in (word_level, tiny_tokenizer()):
        whole = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert _with_eos(tokenizer, [text])[0].tolist() == whole


PACK_UNDER_A_MEMORY_CAP = """
import resource, sys
sys.path.insert(0, {fixtures!r})
from not_hub.data import pack_blocks
from tiny_tokenizer import tiny_tokenizer
tokenizer = tiny_tokenizer()
pack_blocks(["warm up"] * 300, tokenizer, 4)
size = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (512 << 20), resource.RLIM_INFINITY))  # 512 MiB more, no further
text = ("int f(int x) {{ return x + 1; }} " * 120_000)[:3_000_000]  # a 3 MB file of one line
print(len(pack_blocks([text], tokenizer, 256)), "blocks")
"""


def test_packing_a_multi_megabyte_line_stays_within_a_memory_bound():
    import sys

    script = PACK_UNDER_A_MEMORY_CAP.format(fixtures=str(Path(__file__).parent / "fixtures"))
    out = warm_python.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "11718 blocks" in out.stdout


def test_two_organs_trained_for_one_slot_are_reported_and_warned():
    from not_hub.errors import SameSlotWarning

    base = tiny_model("llama")
    first = not_hub.extract_organ(base, layer_range=(1, 3), base_model="org/base")
    second = not_hub.extract_organ(tiny_model("llama", seed=4), layer_range=(1, 3), base_model="org/base")
    other_slot = not_hub.extract_organ(tiny_model("llama", seed=4), layer_range=(3, 5), base_model="org/base")
    recipient = tiny_model("llama")
    assert not second.check_compatibility(recipient).warnings  # nothing grafted yet
    first.transplant_into(recipient, position=1)
    report = second.check_compatibility(recipient)
    assert report.compatible and [row.field for row in report.warnings] == ["trained slot"]
    assert "WARNS" in str(report)
    with pytest.warns(SameSlotWarning, match=r"trained for the same slot \(layers \[1, 3\) of org/base\)"):
        second.transplant_into(recipient, position=3, mode="insert")
    assert not other_slot.check_compatibility(tiny_model("llama")).warnings
