"""Reliability and security: no code from a checkpoint, no mixed runs, no half-written organs, every bad input named.

Each test is a finding of the fault probes (issue 14) turned into a check that fails on the code that had it.
"""

import functools
import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import warm_python
from tiny_models import tiny_input_ids, tiny_model
from tiny_tokenizer import code_documents, tiny_tokenizer
from transformers import AutoModel

import not_hub
from not_hub.data import make_blocks, split_documents
from not_hub.errors import (
    CheckpointFormatError,
    IncompatibleOrganError,
    InvalidArgumentError,
    InvalidLayerRangeError,
    InvalidPositionError,
    RunDirMismatchError,
    UnsafeCheckpointError,
)
from not_hub.training import OrganTrainingArguments, train_organ

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def blocks():
    return make_blocks(split_documents(code_documents(), seed=0), tiny_tokenizer(), 32)


# ------------------------------------------------------------------------------------ no code from a checkpoint

PLANTED = """
import pathlib
pathlib.Path({marker!r}).write_text("the checkpoint ran code")
from transformers.models.llama.modeling_llama import LlamaDecoderLayer as DecoderLayer
"""


@pytest.mark.parametrize(
    "layer_class",
    [
        "organ_helpers:DecoderLayer",  # a module planted beside the checkpoint
        "this:nothing",  # an installed module with import side effects
        "transformers.models.qwen2.modeling_qwen2:Qwen2DecoderLayer",  # transformers, but not the recorded family
        "transformers.models.llama.modeling_llama:os.system",  # the right module, but reaching out of it
    ],
)
def test_loading_never_imports_a_module_named_by_the_checkpoint(tmp_path, monkeypatch, layer_class):
    organ = not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3))
    organ.config.signature["decoder_layer_class"] = layer_class
    organ.save_pretrained(tmp_path / "organ")  # the attacker writes every sha256: integrity checks pass
    marker = tmp_path / "ran.txt"
    (tmp_path / "organ_helpers.py").write_text(PLANTED.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    before = set(sys.modules)
    for load in (not_hub.OrganModel.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(UnsafeCheckpointError, match="decoder_layer_class"):
            load(str(tmp_path / "organ"))
    from not_hub.cli import main

    assert main(["inspect", str(tmp_path / "organ")]) == 1
    assert not marker.exists()
    assert not {"organ_helpers", "this"} & (set(sys.modules) - before)


def test_an_unknown_donor_model_type_is_refused_before_any_import(tmp_path):
    organ = not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3))
    organ.config.donor_model_type = "organ_helpers"
    organ.save_pretrained(tmp_path / "organ")
    with pytest.raises(UnsafeCheckpointError, match="model_type='organ_helpers'"):
        not_hub.OrganModel.from_pretrained(tmp_path / "organ")


# ------------------------------------------------------------------------------------------ no mixed runs


def test_a_run_dir_refuses_another_organ_other_hyper_parameters_or_data(tmp_path, blocks):
    donor = tiny_model("llama")
    run = str(tmp_path / "run")
    common = dict(max_steps=2, batch_size=4, save_every=1, progress=False, output_dir=run)
    train_organ(not_hub.extract_organ(donor, layer_range=(2, 4)), donor, blocks, lr=1e-3, **common)
    assert json.loads((tmp_path / "run" / "run_identity.json").read_text())["hyper_parameters"]["lr"] == 1e-3

    other_organ = not_hub.extract_organ(donor, layer_range=(0, 2))
    state = {k: v.clone() for k, v in other_organ.state_dict().items()}
    with pytest.raises(RunDirMismatchError, match="initial_trainable_sha256"):
        train_organ(other_organ, donor, blocks, lr=1e-3, **common)
    assert all(torch.equal(state[k], v) for k, v in other_organ.state_dict().items())  # nothing resumed into it
    with pytest.raises(RunDirMismatchError, match=r"lr \(0.001 -> 0.003\)"):
        train_organ(not_hub.extract_organ(donor, layer_range=(2, 4)), donor, blocks, lr=3e-3, **common)
    other_data = make_blocks(split_documents(code_documents(), seed=1), tiny_tokenizer(), 32)
    with pytest.raises(RunDirMismatchError, match="train_data_sha256"):
        train_organ(not_hub.extract_organ(donor, layer_range=(2, 4)), donor, other_data, lr=1e-3, **common)
    with pytest.raises(RunDirMismatchError, match="frozen_model_sha256"):
        train_organ(
            not_hub.extract_organ(donor, layer_range=(2, 4)), tiny_model("llama", seed=3), blocks, lr=1e-3, **common
        )
    # The same run resumes (a larger budget is allowed); resume=False starts over and records the new run.
    train_organ(not_hub.extract_organ(donor, layer_range=(2, 4)), donor, blocks, lr=1e-3, max_seconds=60, **common)
    train_organ(other_organ, donor, blocks, lr=1e-3, resume=False, **common)
    identity = json.loads((tmp_path / "run" / "run_identity.json").read_text())
    assert identity["trainable_parameters"][0].startswith("model.layers.0.")


def test_a_corrupted_run_dir_checkpoint_is_a_named_error(tmp_path, blocks):
    donor = tiny_model("llama")
    common = dict(max_steps=1, batch_size=4, progress=False, output_dir=str(tmp_path / "run"))
    train_organ(not_hub.extract_organ(donor, layer_range=(2, 4)), donor, blocks, **common)
    checkpoint = next((tmp_path / "run").glob("checkpoint-*"))
    for path in checkpoint.rglob("*"):
        if path.is_file() and path.suffix in (".bin", ".safetensors", ".pt"):
            path.write_bytes(b"garbage")
    with pytest.raises(CheckpointFormatError, match="cannot be read"):
        train_organ(not_hub.extract_organ(donor, layer_range=(2, 4)), donor, blocks, **common)


def test_train_refuses_an_organ_that_does_not_fit_the_donor(blocks, hash_state):
    organ = not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3))
    donor = tiny_model("qwen2")
    before_organ, before_donor = hash_state(organ), hash_state(donor)
    for method in ("standalone", "in_situ"):
        with pytest.raises(IncompatibleOrganError, match="decoder_layer_class"):
            train_organ(organ, donor, blocks, method=method, max_steps=1, progress=False)
    assert hash_state(organ) == before_organ and hash_state(donor) == before_donor


@pytest.mark.parametrize(
    "field, value",
    [
        ("epochs", 0),
        ("epochs", -1),
        ("epochs", float("nan")),
        ("lr", -1.0),
        ("lr", float("nan")),
        ("lr", 0),
        ("max_steps", 0),
        ("max_steps", -3),
        ("batch_size", 0),
        ("gradient_accumulation_steps", 0),
        ("save_every", 0),
        ("eval_every", 0),
        ("warmup_ratio", 5),
        ("max_seconds", -1),
        ("max_seconds", 0),
        ("mixed_precision", "fp8"),
        ("batch_size", True),
        ("seed", 2**70),
        ("seed", -1),
        ("max_tokens", 0),
    ],
)
def test_zero_negative_or_nan_training_lengths_are_refused(field, value, blocks, hash_state, tmp_path):
    donor = tiny_model("llama")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    before = hash_state(organ)
    with pytest.raises(InvalidArgumentError, match=field):
        train_organ(organ, donor, blocks, progress=False, output_dir=str(tmp_path / "run"), **{field: value})
    with pytest.raises(InvalidArgumentError, match=field):
        OrganTrainingArguments(**{field: value}).validate()
    assert hash_state(organ) == before and not (tmp_path / "run").exists()


def test_block_size_past_the_model_context_is_refused(blocks):
    gpt2 = tiny_model("gpt2", n_positions=16)  # blocks are 32 tokens
    organ = not_hub.extract_organ(gpt2, layer_range=(1, 3))
    with pytest.raises(InvalidArgumentError, match="context of 16 tokens"):
        train_organ(organ, gpt2, blocks, method="standalone", max_steps=1, progress=False)


# ------------------------------------------------------------------------------ models left as they were found


BF16_RUN = """
import sys, torch
sys.path.insert(0, {fixtures!r})
import not_hub
from not_hub.data import make_blocks, split_documents
from not_hub.training import OrganTrainingArguments, fit_parameters, train_organ
from tiny_models import tiny_input_ids, tiny_model
from tiny_tokenizer import code_documents, tiny_tokenizer

blocks = make_blocks(split_documents(code_documents(), seed=0), tiny_tokenizer(), 32)
donor = tiny_model("llama")
ids = tiny_input_ids()
args = OrganTrainingArguments(max_steps=1, lr=1e-3, batch_size=4, mixed_precision="bf16", progress=False)
fit_parameters(donor, list(donor.model.layers[3].parameters()), blocks, args)
assert "forward" not in vars(donor) and "_original_forward" not in vars(donor), sorted(vars(donor))
with torch.no_grad():
    assert donor(ids).logits.dtype == torch.float32
    assert torch.equal(donor(ids).logits, type(donor).forward(donor, ids).logits)  # no autocast left
organ = not_hub.extract_organ(donor, layer_range=(1, 3))
before = {{k: v.clone() for k, v in organ.state_dict().items()}}
train_organ(organ, donor, blocks, method="standalone", max_steps=2, lr=1e-2, batch_size=4, progress=False)
assert any(not torch.equal(before[k], v) for k, v in organ.state_dict().items()), "the standalone organ trained nothing"
print("BF16-OK")
"""


def test_bf16_mixed_precision_training_leaves_the_model_as_it_found_it():
    """accelerate wraps `forward` in autocast; after training the model runs its own forward again, so evaluation
    is fp32 and a later standalone run (whose shell copies the donor's attributes) trains the organ. A fresh
    process: accelerate's state is process-wide and the rest of the suite trains in fp32."""
    out = warm_python.run(
        [sys.executable, "-c", BF16_RUN.format(fixtures=str(FIXTURES))], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "BF16-OK" in out.stdout, out.stderr[-3000:]


HOSTILE_LOAD = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
import not_hub
t0 = time.perf_counter()
try:
    not_hub.OrganModel.from_pretrained(sys.argv[1])
except not_hub.errors.CheckpointFormatError as err:
    print("REFUSED", round(time.perf_counter() - t0, 2), err)
"""


@pytest.mark.parametrize("change", ["layer_range", "donor_width"])
def test_a_small_checkpoint_cannot_make_loading_allocate_unbounded_memory(tmp_path, change):
    """A self-consistent 2-layer checkpoint (config hash recomputed, as anyone publishing it could) whose config
    asks for 100,000 layers or a 4096-wide donor: refused from the weights file's contents before any layer is
    allocated, under a 3 GiB address-space cap."""
    from safetensors.torch import load_file, save_file

    from not_hub.integrity import config_sha256

    organ = not_hub.extract_organ(tiny_model("llama"), layer_range=(2, 4))
    organ.save_pretrained(tmp_path / "organ")
    config = json.loads((tmp_path / "organ" / "config.json").read_text())
    if change == "layer_range":
        config["layer_range"] = [0, 100000]
    else:
        config["donor_config"].update(hidden_size=4096, intermediate_size=16384, num_hidden_layers=40, head_dim=1024)
    (tmp_path / "organ" / "config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "organ" / "model.safetensors")
    save_file(
        tensors,
        tmp_path / "organ" / "model.safetensors",
        metadata={"not_hub.config_sha256": config_sha256(config), "format": "pt"},
    )
    out = warm_python.run(
        [sys.executable, "-c", HOSTILE_LOAD, str(tmp_path / "organ")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.startswith("REFUSED"), (out.stdout + out.stderr)[-3000:]
    assert float(out.stdout.split()[1]) < 10  # refused at once, not after building layers
    assert ("describes 100000 layers" if change == "layer_range" else "does not fit the layers") in out.stdout


def test_odd_inputs_are_refused_not_reinterpreted(tmp_path, blocks):
    from not_hub.evaluation import add_evaluation_result, perplexity

    model = tiny_model("llama")
    with pytest.raises(InvalidArgumentError, match="one string"):
        perplexity(model, "int f(int x) { return x; }", tokenizer=tiny_tokenizer())
    organ = not_hub.extract_organ(model, layer_range=(2, 4))
    for value in (float("nan"), float("inf"), "7.5"):
        with pytest.raises(InvalidArgumentError, match="not a finite number"):
            add_evaluation_result(organ.config, dataset="d", value=value, baseline=8.0, position=2, mode="replace")
    assert organ.config.evaluation is None
    (tmp_path / "numbers.jsonl").write_text('{"text": "fine"}\n{"text": 5}\n')
    with pytest.raises(not_hub.errors.DataError, match="of type int in record 1"):
        not_hub.load_documents(tmp_path / "numbers.jsonl")
    # a stray `checkpoint-abc/` folder in a run dir is not a checkpoint: it is skipped, not a raw ValueError
    run = tmp_path / "run"
    kwargs = dict(method="standalone", max_steps=2, lr=3e-3, batch_size=8, progress=False, output_dir=str(run))
    train_organ(not_hub.extract_organ(model, layer_range=(2, 4)), model, blocks, **kwargs)
    (run / "checkpoint-abc").mkdir()
    (run / "checkpoint-abc" / "not_hub_state.json").write_text("{}")
    assert train_organ(not_hub.extract_organ(model, layer_range=(2, 4)), model, blocks, **kwargs).steps == 2


def test_a_recipient_with_disk_offloaded_layers_is_refused_before_it_is_touched(tmp_path):
    from accelerate import dispatch_model

    recipient = tiny_model("llama")
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": "disk" if i in (2, 3) else "cpu" for i in range(6)}
    recipient = dispatch_model(recipient, device_map=device_map, offload_dir=str(tmp_path / "offload"))
    ids = tiny_input_ids()
    with torch.no_grad():
        before_logits = recipient(ids).logits
    # (its offloaded weights are on 'meta': the state cannot be hashed; its layers, config and logits can)
    layers, config = [id(layer) for layer in recipient.model.layers], recipient.config.to_json_string()
    organ = not_hub.extract_organ(tiny_model("llama", seed=2), layer_range=(2, 4))
    for mode, position in (("replace", 2), ("insert", 3), ("insert", 0)):  # beside, among, or far from them
        with pytest.raises(not_hub.errors.TransplantStateError, match=r"layers \[2, 3\] hold their weights on 'meta'"):
            organ.transplant_into(recipient, position=position, mode=mode)
    assert [id(layer) for layer in recipient.model.layers] == layers and recipient.config.to_json_string() == config
    with torch.no_grad():
        assert torch.equal(recipient(ids).logits, before_logits)  # still runs, through its offload hooks


@pytest.mark.parametrize("mode", ["replace", "insert"])
def test_explant_after_a_dtype_change_restores_a_working_model(mode):
    recipient = tiny_model("llama")
    organ = not_hub.extract_organ(tiny_model("llama", seed=4), layer_range=(1, 3))
    record = organ.transplant_into(recipient, position=2, mode=mode)
    recipient.to(torch.bfloat16)
    record.explant()
    assert {p.dtype for p in recipient.parameters()} == {torch.bfloat16}
    reference = tiny_model("llama").to(torch.bfloat16)
    for (name, a), (_, b) in zip(recipient.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(recipient(tiny_input_ids()).logits, reference(tiny_input_ids()).logits)


# ----------------------------------------------------------------------------------------- atomic save

KILLER = """
import os, sys
sys.path.insert(0, {fixtures!r})
import not_hub
from not_hub import atomic
from tiny_models import tiny_model

point = sys.argv[1]
organ = not_hub.extract_organ(tiny_model("llama", seed=9), layer_range=(1, 3))
real_exchange = atomic.exchange_paths

def exchange(a, b):
    if point == "before-exchange":
        os._exit(9)
    done = real_exchange(a, b)
    if point == "after-exchange":
        os._exit(9)
    return done

atomic.exchange_paths = exchange
organ.save_pretrained(sys.argv[2])
"""


@pytest.mark.parametrize("point", ["before-exchange", "after-exchange"])
def test_a_kill_during_save_leaves_the_old_organ_or_the_new_one(tmp_path, point):
    target = tmp_path / "organ"
    old = not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3))
    old.save_pretrained(target)
    (target / "NOTES.txt").write_text("kept")
    out = warm_python.run(
        [sys.executable, "-c", KILLER.format(fixtures=str(FIXTURES)), point, str(target)], capture_output=True
    )
    assert out.returncode == 9, out.stderr.decode()[-2000:]
    loaded = not_hub.OrganModel.from_pretrained(target)  # loads: never new config beside old weights
    new = not_hub.extract_organ(tiny_model("llama", seed=9), layer_range=(1, 3))
    expected = old if point == "before-exchange" else new
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert (target / "NOTES.txt").read_text() == "kept"
    strays = [p.name for p in tmp_path.iterdir() if p.name.startswith(".organ.")]
    assert strays  # the killed save left its temporary folder ...
    old.save_pretrained(target)  # ... and the next save cleans it up
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".organ.")]


def test_a_failing_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "organ"
    organ = not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3))
    organ.save_pretrained(target)
    files = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("not_hub.modeling_organ.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        not_hub.extract_organ(tiny_model("llama", seed=2), layer_range=(1, 3)).save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == files
    assert [p.name for p in tmp_path.iterdir()] == ["organ"]


def test_saving_onto_an_existing_file_is_refused(tmp_path):
    (tmp_path / "organ").write_text("not a folder")
    with pytest.raises(not_hub.errors.OutputPathError, match="existing file"):
        not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3)).save_pretrained(tmp_path / "organ")
    assert (tmp_path / "organ").read_text() == "not a folder"


# ------------------------------------------------------------------------------------- optional metadata


def test_a_malformed_donor_card_does_not_stop_extraction(tmp_path, caplog):
    donor = tiny_model("llama")
    donor.save_pretrained(tmp_path / "donor")
    (tmp_path / "donor" / "README.md").write_text("---\nlicense: [apache-2.0\n  bad: : yaml\n---\n# card\n")
    donor.name_or_path = str(tmp_path / "donor")
    organ = not_hub.extract_organ(donor, layer_range=(1, 3))
    assert organ.config.license is None and "licence" in caplog.text


# ---------------------------------------------------------------------------------------------- API input


def test_numpy_integers_are_positions_and_odd_values_are_refused(hash_state):
    recipient = tiny_model("llama")
    organ = not_hub.extract_organ(recipient, layer_range=(2, 4))
    with organ.transplanted(recipient, position=np.int64(2)) as record:
        assert record.position == 2 and type(record.position) is int
    before = hash_state(recipient)
    for bad in (2.0, True, "2"):
        with pytest.raises(InvalidPositionError):
            organ.transplant_into(recipient, position=bad)
    with pytest.raises(InvalidPositionError, match="cannot be inserted into"):
        organ.transplant_into(recipient, position=7, mode="insert")
    assert hash_state(recipient) == before


@pytest.mark.parametrize("layer_range", [(1.5, 3), (True, 3), "13", (1, 2, 3), (1,)])
def test_layer_ranges_that_are_not_two_integers_are_refused(layer_range):
    with pytest.raises(InvalidLayerRangeError, match="pair of integers"):
        not_hub.extract_organ(tiny_model("llama"), layer_range=layer_range)
    assert not_hub.extract_organ(tiny_model("llama"), layer_range=(np.int64(1), 3)).config.layer_range == (1, 3)


def test_a_config_that_is_not_a_json_object_is_a_format_error(tmp_path):
    not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3)).save_pretrained(tmp_path / "organ")
    (tmp_path / "organ" / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointFormatError, match="JSON list"):
        not_hub.OrganModel.from_pretrained(tmp_path / "organ")


def test_bart_for_causal_lm_is_described_as_encoder_decoder():
    from transformers import BartConfig, BartForCausalLM

    config = BartConfig(
        vocab_size=64,
        d_model=16,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
    )
    with pytest.raises(not_hub.errors.UnsupportedArchitectureError, match="encoder-decoder"):
        not_hub.extract_organ(BartForCausalLM(config), layer_range=(0, 1))


def test_recovery_radius_and_sweep_positions_are_checked(blocks, hash_state):
    from not_hub.evaluation import position_sweep
    from not_hub.training import recover

    recipient = tiny_model("llama")
    organ = not_hub.extract_organ(recipient, layer_range=(2, 4))
    before = hash_state(recipient)
    with organ.transplanted(recipient) as record:
        with pytest.raises(InvalidArgumentError, match="radius=-1"):
            recover(recipient, record, blocks, radius=-1, max_steps=1, progress=False)
    with pytest.raises(InvalidPositionError, match=r"positions \[99\]"):
        position_sweep(organ, recipient, [[1, 2, 3, 4]], positions=[99])
    for kwargs in (dict(stride=0), dict(max_length=1), dict(max_length=0)):
        with pytest.raises(InvalidArgumentError):
            not_hub.evaluation.perplexity(recipient, [[1, 2, 3, 4]], **kwargs)
    assert hash_state(recipient) == before


# ---------------------------------------------------------------------------------------------- the Space


def test_space_bounds_the_prompt_and_never_holds_the_lock_between_tokens(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parents[1] / "spaces" / "not-hub-transplant"))
    import engine

    gpt2 = tiny_model("gpt2", n_positions=64)
    gpt2.save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer().save_pretrained(tmp_path / "gpt2")
    not_hub.extract_organ(gpt2, layer_range=(1, 3)).save_pretrained(tmp_path / "organ")
    recipient, organ = str(tmp_path / "gpt2"), str(tmp_path / "organ")
    monkeypatch.setattr(engine, "SERVER_FOLDERS", [*engine.SERVER_FOLDERS, tmp_path.resolve()])  # offered here
    with pytest.raises(not_hub.errors.InvalidArgumentError, match="characters"):
        next(engine.stream_side_by_side(recipient, organ, "replace", 1, "x" * 100_000))
    with pytest.raises(not_hub.errors.InvalidArgumentError, match="context of 64 tokens"):
        next(engine.stream_side_by_side(recipient, organ, "replace", 1, "int a = 1; " * 40))
    stream = engine.stream_side_by_side(recipient, organ, "replace", 1, "public int f() {")
    next(stream)  # a visitor reads one token, then stops reading
    loaded = engine.CACHE.recipient(recipient)
    assert loaded.lock.acquire(blocking=False)  # nobody else waits behind the paused stream
    loaded.lock.release()
    assert not not_hub.transplants_of(loaded.working)  # and the working copy carries no organ meanwhile
    stream.close()


# -------------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    w = tmp_path_factory.mktemp("cli")
    model = tiny_model("llama")
    model.save_pretrained(w / "model")
    tiny_tokenizer().save_pretrained(w / "model")
    gpt2 = tiny_model("gpt2", n_positions=64)
    gpt2.save_pretrained(w / "gpt2")
    tiny_tokenizer().save_pretrained(w / "gpt2")
    not_hub.extract_organ(model, layer_range=(2, 4)).save_pretrained(w / "organ")
    not_hub.extract_organ(gpt2, layer_range=(2, 4)).save_pretrained(w / "gpt2-organ")
    docs = code_documents(300)
    (w / "train.txt").write_text("\n".join(docs))
    (w / "empty.txt").write_text("")
    (w / "blank.txt").write_text("   \n\n  \n")
    (w / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (w / "bad.jsonl").write_text('{"text": "a"}\n{not json\n')
    (w / "notext.jsonl").write_text('{"body": "a"}\n{"body": "b"}\n')
    (w / "one.txt").write_text("public int f() { return 1; }")
    (w / "few.txt").write_text("a b c\n\nd e f")
    (w / "garbage.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    (w / "a-file").write_text("x")
    return w


def _cli(argv, capsys) -> tuple[int, str]:
    from not_hub.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    return code, capsys.readouterr().err


def _train(w, *extra, data="train.txt"):
    return [
        "train",
        w / "organ",
        "--donor",
        w / "model",
        "--out",
        w / "out",
        "--data",
        w / data,
        "--unit",
        "line",
        "--block-size",
        "16",
        "--max-steps",
        "1",
        *extra,
    ]


def _command(w, cmd, data):
    head = {
        "sweep": ["sweep", w / "organ", "--recipient", w / "model"],
        "recover": ["recover", w / "organ", "--recipient", w / "model", "--position", "2"],
        "evaluate": ["evaluate", w / "model"],
    }[cmd]
    return (
        [*head, "--data", w / data, "--block-size", "16", "--max-steps", "1"]
        if cmd == "recover"
        else [*head, "--data", w / data]
    )


def _eval(w, *extra):
    return ["evaluate", w / "model", "--data", w / "train.txt", "--unit", "line", *extra]


CLI_CASES = {
    # runtime errors: exit 1, one "error:" line
    "extract: no such model": (lambda w: ["extract", w / "nowhere", "--out", w / "o"], 1, "no such folder"),
    "extract: garbage gguf": (lambda w: ["extract", w / "garbage.gguf", "--out", w / "o"], 1, "could not load"),
    "extract: --out is a file": (lambda w: ["extract", w / "model", "--out", w / "a-file"], 1, "existing file"),
    "inspect: no such organ": (lambda w: ["inspect", w / "nowhere"], 1, "neither a folder"),
    "transplant: no such recipient": (
        lambda w: ["transplant", "--organ", w / "organ", "--recipient", w / "nowhere"],
        1,
        "no such folder",
    ),
    "transplant: empty prompt": (
        lambda w: ["transplant", "--organ", w / "organ", "--recipient", w / "model", "--prompt", ""],
        1,
        "prompt is empty",
    ),
    "transplant: bad position": (
        lambda w: ["transplant", "--organ", w / "organ", "--recipient", w / "model", "--position", "9"],
        1,
        "expected 0 <= position <= 4",
    ),
    "evaluate: no such model": (lambda w: ["evaluate", w / "nowhere", "--data", w / "train.txt"], 1, "no such folder"),
    "pull: offline": (lambda w: ["pull", "user/organ"], 1, "not in the local Hub cache"),
    "search: offline": (lambda w: ["search"], 1, "HF_HUB_OFFLINE"),
    "train: empty file": (lambda w: _train(w, data="empty.txt"), 1, "holds no text"),
    "train: blank file": (lambda w: _train(w, data="blank.txt"), 1, "holds no text"),
    "train: binary file": (lambda w: _train(w, data="binary.txt"), 1, "could not read documents"),
    "train: malformed jsonl": (lambda w: _train(w, data="bad.jsonl"), 1, "could not read documents"),
    "train: jsonl without text": (lambda w: _train(w, data="notext.jsonl"), 1, "no field 'text'"),
    "train: missing data file": (lambda w: _train(w, data="nowhere.txt"), 1, "neither a file"),
    "train: one document": (lambda w: _train(w, data="one.txt"), 1, "too few"),
    "train: too few documents": (lambda w: _train(w, data="few.txt"), 1, "too few"),
    "train: block past the data": (lambda w: _train(w, "--block-size", "10000000"), 1, "fewer than block_size"),
    "train: --out is a file": (lambda w: _train(w, "--out", w / "a-file"), 1, "existing file"),
    "train: block past gpt2 context": (
        lambda w: [
            "train",
            w / "gpt2-organ",
            "--donor",
            w / "gpt2",
            "--out",
            w / "out",
            "--data",
            w / "train.txt",
            "--unit",
            "line",
            "--block-size",
            "100",
            "--max-steps",
            "1",
        ],
        1,
        "context of 64 tokens",
    ),
    "train: incompatible donor": (
        lambda w: [
            "train",
            w / "gpt2-organ",
            "--donor",
            w / "model",
            "--out",
            w / "out",
            "--data",
            w / "train.txt",
            "--unit",
            "line",
            "--block-size",
            "16",
            "--max-steps",
            "1",
        ],
        1,
        "does not fit the donor",
    ),
    "sweep: position out of range": (
        lambda w: [
            "sweep",
            w / "organ",
            "--recipient",
            w / "model",
            "--data",
            w / "train.txt",
            "--unit",
            "line",
            "--positions",
            "99",
        ],
        1,
        "positions [99]",
    ),
    "evaluate: max-length past gpt2 context": (
        lambda w: ["evaluate", w / "gpt2", "--data", w / "train.txt", "--unit", "line", "--max-length", "512"],
        1,
        "context of 64 tokens",
    ),
    # every data-reading command, on each kind of bad data; every Hub command on a bad repo
    **{
        f"{cmd}: {what}": (
            functools.partial(_command, cmd=cmd, data=data),
            1,
            text,
        )
        for cmd in ("sweep", "recover", "evaluate")
        for what, data, text in (
            ("empty file", "empty.txt", "holds no text"),
            ("missing file", "nowhere.txt", "neither a file"),
            ("too few documents", "few.txt", "too few"),
        )
    },
    "recover: bad position": (
        lambda w: [
            "recover",
            w / "organ",
            "--recipient",
            w / "model",
            "--position",
            "9",
            "--data",
            w / "train.txt",
            "--unit",
            "line",
        ],
        1,
        "expected 0 <= position <= 4",
    ),
    "sweep: no such organ": (
        lambda w: ["sweep", w / "nowhere", "--recipient", w / "model", "--data", w / "train.txt"],
        1,
        "neither a folder",
    ),
    "push: no such folder": (lambda w: ["push", w / "nowhere", "user/organ"], 1, "neither a folder"),
    "push: malformed repo id": (lambda w: ["push", w / "organ", "user/.."], 1, "malformed"),
    "pull: malformed repo id": (lambda w: ["pull", "a/.."], 1, "malformed"),
    # usage errors: argparse exits 2 naming the flag
    "search: --limit -1": (lambda w: ["search", "--limit", "-1"], 2, "--limit"),
    "train: --validation-fraction 1.5": (lambda w: _train(w, "--validation-fraction", "1.5"), 2, "fraction"),
    "train: --block-size 0": (lambda w: _train(w, "--block-size", "0"), 2, "--block-size"),
    "train: --block-size -5": (lambda w: _train(w, "--block-size", "-5"), 2, "--block-size"),
    "train: --block-size 1": (lambda w: _train(w, "--block-size", "1"), 2, "--block-size"),
    "train: --epochs nan": (lambda w: _train(w, "--epochs", "nan"), 2, "--epochs"),
    "train: --epochs 0": (lambda w: _train(w, "--epochs", "0"), 2, "--epochs"),
    "train: --epochs -1": (lambda w: _train(w, "--epochs", "-1"), 2, "--epochs"),
    "train: --lr -1": (lambda w: _train(w, "--lr", "-1"), 2, "--lr"),
    "train: --lr nan": (lambda w: _train(w, "--lr", "nan"), 2, "--lr"),
    "train: --batch-size 0": (lambda w: _train(w, "--batch-size", "0"), 2, "--batch-size"),
    "train: --grad-accum 0": (lambda w: _train(w, "--grad-accum", "0"), 2, "--grad-accum"),
    "train: --max-steps -3": (lambda w: _train(w, "--max-steps", "-3"), 2, "--max-steps"),
    "train: --max-steps 0": (lambda w: _train(w, "--max-steps", "0"), 2, "--max-steps"),
    "train: --save-every 0": (lambda w: _train(w, "--save-every", "0"), 2, "--save-every"),
    "train: --eval-every 0": (lambda w: _train(w, "--eval-every", "0"), 2, "--eval-every"),
    "train: --warmup-ratio 5": (lambda w: _train(w, "--warmup-ratio", "5"), 2, "--warmup-ratio"),
    "evaluate: --max-length 0": (lambda w: _eval(w, "--max-length", "0"), 2, "--max-length"),
    "evaluate: --max-length 1": (lambda w: _eval(w, "--max-length", "1"), 2, "--max-length"),
    "evaluate: --stride 0": (lambda w: _eval(w, "--stride", "0"), 2, "--stride"),
    "evaluate: --record with a repo id": (
        lambda w: _eval(w, "--organ", "user/organ", "--record"),
        1,
        "is not a local folder",
    ),
    "evaluate: --max-eval-docs 0": (lambda w: _eval(w, "--max-eval-docs", "0"), 2, "--max-eval-docs"),
    "recover: --radius -1": (
        lambda w: [
            "recover",
            w / "organ",
            "--recipient",
            w / "model",
            "--position",
            "2",
            "--radius",
            "-1",
            "--data",
            w / "train.txt",
        ],
        2,
        "--radius",
    ),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_every_cli_user_error_exits_non_zero_with_one_clear_line(case, workspace, capsys):
    argv, expected_code, expected_text = CLI_CASES[case]
    code, err = _cli(argv(workspace), capsys)
    assert code == expected_code, err
    assert "Traceback" not in err and expected_text in err, err
    if expected_code == 1:
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, err
    assert not (workspace / "out").exists()  # nothing was trained or written


def test_cli_version(capsys):
    code, _ = _cli(["--version"], capsys)
    assert code == 0


def test_run_identity_file_is_reused_by_the_cli_and_no_resume_starts_over(workspace, capsys, tmp_path):
    w = workspace
    base = _train(w, "--run-dir", tmp_path / "run", "--out", tmp_path / "o1")
    assert _cli(base, capsys)[0] == 0
    code, err = _cli([*base, "--lr", "3e-3"], capsys)
    default_lr = not_hub.DEFAULT_LR[not_hub.training.DEFAULT_METHOD]  # the method's own, resolved before the check
    assert code == 1 and "--run-dir" in err and f"lr ({default_lr!r} -> 0.003)" in err
    assert _cli([*base, "--lr", "3e-3", "--no-resume"], capsys)[0] == 0


def test_cli_trains_a_streamed_corpus_under_a_token_or_time_budget(workspace, capsys, tmp_path):
    w = workspace
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in code_documents(600)))
    head = ["train", w / "organ", "--donor", w / "model", "--data", corpus, "--block-size", "16", "--eval-docs", "4"]
    code, err = _cli([*head, "--out", tmp_path / "o0", "--stream"], capsys)
    assert code == 1 and "--max-tokens" in err  # a stream has no length: a budget is required, and said so
    assert _cli([*head, "--out", tmp_path / "o1", "--stream", "--max-tokens", "1280"], capsys)[0] == 0
    training = json.loads((tmp_path / "o1" / "config.json").read_text())["training"]
    assert training["steps"] == 10 and training["tokens_seen"] == 1280 and training["data"]["streamed"] is True
    assert _cli([*head, "--out", tmp_path / "o2", "--max-seconds", "1"], capsys)[0] == 0
    training = json.loads((tmp_path / "o2" / "config.json").read_text())["training"]
    assert 0 < training["steps"] and training["wall_clock_s"] - training["validation_s"] < 1 + 1.0


def test_subprocess_cli_error_has_no_traceback(workspace):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = warm_python.run(
        [sys.executable, "-m", "not_hub.cli", "inspect", str(workspace / "nowhere")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 1 and out.stderr.strip().startswith("error:") and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, textwrap.shorten(out.stderr, 500)
