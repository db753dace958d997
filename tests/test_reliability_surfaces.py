"""Reliability of the surfaces added in round three (issue 39's probes): several organs grafted for a Trainer and
unloaded in any order, a prefix cache shared between runs, an organ set's manifest. Each test failed before its fix."""

import copy
import json
import time

import pytest
import torch
from test_hub import local_hub, run_scenario  # noqa: F401  (the local Hub server fixture)
from tiny_models import tiny_input_ids, tiny_model
from tiny_tokenizer import code_documents, tiny_tokenizer

import not_hub
from not_hub.cli import main
from not_hub.data import make_blocks, split_documents
from not_hub.errors import (
    CheckpointFormatError,
    DataError,
    InvalidArgumentError,
    ModelLoadError,
    TransplantStateError,
)
from not_hub.prefix_cache import PrefixCache
from not_hub.training import train_organ


@pytest.fixture(scope="module")
def blocks():
    return make_blocks(split_documents(code_documents(), seed=0), tiny_tokenizer(), 32)


# ---------------------------------------------------------------------- get_organ_model / unload_organ, any order


def _two_grafts(model):
    first = not_hub.extract_organ(tiny_model("llama", seed=1), layer_range=(1, 2))
    second = not_hub.extract_organ(tiny_model("llama", seed=2), layer_range=(4, 5))
    not_hub.get_organ_model(first, model)
    t_first = not_hub.transplants_of(model)[-1]
    not_hub.get_organ_model(second, model)
    t_second = not_hub.transplants_of(model)[-1]
    return t_first, t_second


@pytest.mark.parametrize("order", ["oldest_first", "newest_first"])
def test_organs_unloaded_in_any_order_give_back_every_flag_and_weight(order, hash_state):
    model = tiny_model("llama")
    model.model.embed_tokens.weight.requires_grad_(False)  # a flag of the user's own, kept through it all
    before = hash_state(model)
    flags = [(name, p.requires_grad) for name, p in model.named_parameters()]
    use_cache = model.config.use_cache
    t_first, t_second = _two_grafts(model)
    # The second graft keeps the first organ trainable (it silently froze it before): both organs train, nothing else.
    trainable = {id(p) for t in (t_first, t_second) for layer in t.layers for p in layer.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == trainable
    model.config.use_cache = False  # as Trainer leaves it
    if order == "oldest_first":
        not_hub.unload_organ(model, transplant=t_first)
        # The layers that came back are frozen while the other organ still trains.
        live = {id(p) for layer in t_second.layers for p in layer.parameters()}
        assert {id(p) for p in model.parameters() if p.requires_grad} == live
        not_hub.unload_organ(model)
    else:
        not_hub.unload_organ(model)
        not_hub.unload_organ(model)
    assert hash_state(model) == before
    assert [(name, p.requires_grad) for name, p in model.named_parameters()] == flags
    assert model.config.use_cache == use_cache
    with pytest.raises(TransplantStateError, match="get_organ_model"):
        not_hub.unload_organ(model)


def test_a_deepcopy_of_a_grafted_model_unloads_as_the_original(hash_state):
    model = tiny_model("llama")
    before = hash_state(model)
    not_hub.get_organ_model(not_hub.extract_organ(tiny_model("llama", seed=1), layer_range=(2, 4)), model)
    copied = copy.deepcopy(model)
    organ = not_hub.unload_organ(copied)  # (it said "holds no organ" before)
    assert organ.config.num_layers == 2
    assert hash_state(copied) == before and all(p.requires_grad for p in copied.parameters())
    not_hub.unload_organ(model)  # the original is independent of the copy
    assert hash_state(model) == before and all(p.requires_grad for p in model.parameters())


def test_unloading_after_bf16_prepare_removes_accelerates_autocast_wrapper():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)  # (a float32 Trainer run may have set it in this worker)

    model = tiny_model("llama")
    ids = tiny_input_ids()
    with torch.no_grad():
        expected = model(ids).logits
    not_hub.get_organ_model(not_hub.extract_organ(tiny_model("llama"), layer_range=(2, 4)), model)
    try:
        Accelerator(mixed_precision="bf16", cpu=True).prepare_model(model)  # what Trainer does with bf16=True
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)  # later Trainer runs set their own
    assert "forward" in model.__dict__  # the autocast wrapper
    not_hub.unload_organ(model)
    assert "forward" not in model.__dict__ and "_original_forward" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)  # float32 again, bit for bit


# ------------------------------------------------------------------------------------------- a shared prefix cache


def test_a_shared_cache_is_refused_after_a_weight_below_the_organ_changed_through_data(blocks):
    donor = tiny_model("llama")
    cache = PrefixCache.build(donor, 2, [blocks.train[:]["input_ids"], blocks.validation[:]["input_ids"]])
    kwargs = dict(method="in_situ", max_steps=2, lr=3e-3, batch_size=8, progress=False, prefix_cache=cache)
    # Same values written in place (a new version counter, same content): the cache is still right and is reused.
    with torch.no_grad():
        donor.model.layers[0].mlp.up_proj.weight.mul_(1.0)
    train_organ(not_hub.extract_organ(donor, layer_range=(2, 4)), donor, blocks, **kwargs)
    # A change through .data is invisible to version counters and storage pointers; the content hash sees it.
    donor.model.layers[0].mlp.up_proj.weight.data[0, 0] += 0.5
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    initial = {k: v.clone() for k, v in organ.state_dict().items()}
    with pytest.raises(InvalidArgumentError, match="frozen weights below the organ changed"):
        train_organ(organ, donor, blocks, **kwargs)
    assert all(torch.equal(v, initial[k]) for k, v in organ.state_dict().items())


def test_a_cache_shared_across_block_sizes_reads_each_block_at_its_own_shape():
    donor = tiny_model("llama")
    docs = split_documents(code_documents(), seed=0)
    cache = PrefixCache(donor, 2, memory_limit=0)  # everything on disk, where shapes used to be assumed
    for size in (32, 16):
        ids = make_blocks(docs, tiny_tokenizer(), size).train[:8]["input_ids"]
        first = cache.lookup(ids)
        again = cache.lookup(ids)
        assert first.shape[1] == size and torch.equal(first, again)


# --------------------------------------------------------------------------------------------- an organ set's manifest


def _saved_set(tmp_path):
    model = tiny_model("llama")
    grown = [not_hub.grow_organ(model, position=p) for p in (2, 4)]
    first = grown[0].transplant_into(model, position=2)
    second = grown[1].transplant_into(model, position=5)
    not_hub.OrganSet.from_transplants([first, second]).save_pretrained(tmp_path / "set")
    return tmp_path / "set"


def _rewrite(folder, change):
    path = folder / "organ_set.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda m: m["organs"].extend([dict(m["organs"][0])] * 10_000), "at most 256"),
        (lambda m: m["organs"].append(dict(m["organs"][0])), "listed twice"),
        (lambda m: m["organs"][0].update(subfolder="organ-" + "9" * 300), "malformed"),
        (lambda m: m["organs"][0].update(extra=1), "unknown key"),
        (lambda m: m.update(format_version="99.0"), "upgrade not_hub"),
        (lambda m: m.update(format_version=2), "format_version=2"),
        (lambda m: m["organs"][0].update(position=-1), "malformed"),
    ],
    ids=[
        "ten-thousand-entries",
        "duplicate",
        "long-subfolder",
        "extra-key",
        "future-format",
        "odd-format",
        "negative",
    ],
)
def test_a_manifest_is_checked_whole_before_any_organ_is_built(tmp_path, monkeypatch, change, words):
    folder = _saved_set(tmp_path)
    _rewrite(folder, change)
    built = []
    monkeypatch.setattr(not_hub.OrganModel, "from_pretrained", classmethod(lambda cls, *a, **k: built.append(a)))
    with pytest.raises(CheckpointFormatError, match=words):
        not_hub.OrganSet.from_pretrained(folder)
    assert built == []
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    with pytest.raises(CheckpointFormatError, match=words):
        not_hub.load_grafted(folder, recipient=base)


def test_a_set_is_not_built_from_transplants_whose_neighbours_recovery_trained(blocks, hash_state):
    model = tiny_model("llama")
    grown = not_hub.grow_organ(model, position=2)
    transplant = grown.transplant_into(model, position=2)
    not_hub.recover(model, [transplant], blocks, radius=1, max_steps=1, lr=1e-2, progress=False)
    with pytest.raises(TransplantStateError, match="radius=0"):
        not_hub.OrganSet.from_transplants(model)


# ------------------------------------------------------------------------------------------------ streamed corpora


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("empty.txt", b"", "no training documents"),
        ("blank.txt", b"\n\n   \n\t\n", "no training documents"),
        ("latin1.txt", "caf\u00e9 cr\u00e8me ".encode("latin-1") * 200, "not UTF-8"),
        ("binary.txt", bytes(range(128, 256)) * 50, "not UTF-8"),
        ("fields.jsonl", b'{"body": "int f() { return 1; }"}\n' * 50, "no field"),
        ("numbers.jsonl", b'{"text": 12345}\n' * 50, "not text"),
    ],
    ids=["empty", "blank", "latin-1", "binary", "missing-field", "number-field"],
)
def test_a_stream_that_is_not_text_is_refused_before_training(tmp_path, name, content, words):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=words):
        not_hub.stream_blocks(tmp_path / name, tiny_tokenizer(), 32, unit="line")


def test_a_streamed_file_deleted_before_training_reads_it_is_a_data_error_and_the_organ_is_untouched(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(code_documents(200)))
    data = not_hub.stream_blocks(corpus, tiny_tokenizer(), 32, unit="line")
    corpus.unlink()  # gone between the first look and training's pass
    donor = tiny_model("llama")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    before = {k: v.clone() for k, v in organ.state_dict().items()}
    with pytest.raises(DataError, match="must stay in place"):
        train_organ(organ, donor, data, max_steps=2, batch_size=4, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in organ.state_dict().items()) and not organ.config.training


def test_a_token_budget_far_above_the_stream_is_said(tmp_path, caplog):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(code_documents(60)))
    data = not_hub.stream_blocks(corpus, tiny_tokenizer(), 32, unit="line")
    donor = tiny_model("llama")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    with caplog.at_level("WARNING", logger="not_hub.training"):
        metrics = train_organ(organ, donor, data, max_tokens=10**7, batch_size=4, progress=False)
    assert metrics.tokens_seen < 10**6
    assert any("the stream ended after" in r.message for r in caplog.records)


# --------------------------------------------------------------------------------------------------------- the CLI


@pytest.fixture
def cli_workspace(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    not_hub.extract_organ(tiny_model("llama"), layer_range=(2, 4)).save_pretrained(tmp_path / "organ")
    (tmp_path / "train.txt").write_text("\n".join(code_documents(120)))
    return tmp_path


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--stream", "--max-steps", "2", "--validation-data", "{w}/train.txt"], "--validation-data cannot be used"),
        (["--stream", "--max-steps", "2", "--limit-docs", "5"], "--limit-docs cannot be used"),
        (["--max-steps", "1", "--report-to", "bogus"], "report_to="),
    ],
    ids=["stream-validation-data", "stream-limit-docs", "report-to-bogus"],
)
def test_cli_training_options_that_would_be_ignored_or_crash_are_one_line(cli_workspace, capsys, extra, words):
    w = cli_workspace
    argv = ["train", str(w / "organ"), "--donor", str(w / "model"), "--data", str(w / "train.txt"), "--unit", "line"]
    argv += ["--block-size", "32", "--out", str(w / "out"), *[e.format(w=w) for e in extra]]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert _last_line(err).startswith("error: ") and words in err and "Traceback" not in err
    assert not (w / "out").exists()


def test_cli_json_output_stays_json_on_an_error(cli_workspace, capsys):
    w = cli_workspace
    assert main(["inspect", str(w / "nowhere"), "--format", "json"]) == 1
    out = capsys.readouterr().out
    payload = json.loads(out)
    assert payload["type"] == "OrganNotFoundError" and "nowhere" in payload["error"]


# -------------------------------------------------------------------------------- interrupted standalone training


@pytest.mark.parametrize("method", ["standalone", "recovered"])
def test_ctrl_c_in_standalone_training_leaves_the_organ_as_it_was(method, blocks, monkeypatch):
    from not_hub.trainer import OrganTrainer

    donor = tiny_model("llama")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    before = {k: v.clone() for k, v in organ.state_dict().items()}
    step = OrganTrainer.training_step
    calls = []

    def interrupted(self, *args, **kwargs):  # Ctrl-C after the first optimizer step changed the weights
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(OrganTrainer, "training_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_organ(organ, donor, blocks, method=method, max_steps=6, batch_size=8, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in organ.state_dict().items())
    assert not organ.config.training


# ---------------------------------------------------------------------------------------------------- load_grafted


def test_load_grafted_names_an_organ_folder_or_a_missing_tokenizer_as_the_recipient(cli_workspace):
    w = cli_workspace
    with pytest.raises(InvalidArgumentError, match="is an organ folder, not a model"):
        not_hub.load_grafted(w / "organ", recipient=w / "organ")
    tiny_model("llama").save_pretrained(w / "no-tokenizer")
    with pytest.raises(ModelLoadError, match="no usable tokenizer"):
        not_hub.load_grafted(w / "organ", recipient=w / "no-tokenizer")


def test_a_hub_organ_naming_a_local_path_as_base_model_is_not_loaded_from_it(local_hub, tmp_path):  # noqa: F811
    run_scenario(
        local_hub,
        tmp_path,
        f"""
        from not_hub.errors import InvalidArgumentError
        donor = tiny_model("llama")
        organ = not_hub.extract_organ(donor, layer_range=(1, 3), base_model={str(tmp_path / "private-model")!r})
        organ.push_to_hub("user/sneaky-organ")
        try:
            not_hub.load_grafted("user/sneaky-organ")
        except InvalidArgumentError as err:
            assert "local path" in str(err), err
        else:
            raise AssertionError("loaded a local path named by a Hub organ")
        """,
    )


# ------------------------------------------------------------------------------------------------- launches


def test_processes_that_do_not_see_each_other_are_refused_before_the_run_dir_is_written(blocks, monkeypatch, tmp_path):
    # What `accelerate launch` with an FSDP config gives on a machine without GPUs: torchrun starts the processes,
    # but accelerate 1.x sets up FSDP only on accelerators, and each process sees itself alone.
    from not_hub.errors import DistributedSetupError

    monkeypatch.setenv("WORLD_SIZE", "2")
    donor = tiny_model("llama")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    with pytest.raises(DistributedSetupError, match="ACCELERATE_USE_CPU=1"):
        train_organ(organ, donor, blocks, max_steps=1, progress=False, output_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists() and not organ.config.training


# ------------------------------------------------------------------------------------------- damaged checkpoints


@pytest.mark.parametrize("damaged", ["trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_any_damaged_file_of_a_trainer_checkpoint_is_a_named_error_before_training(tmp_path, blocks, damaged):
    from not_hub.errors import CheckpointFormatError

    donor = tiny_model("llama")
    common = dict(max_steps=2, batch_size=4, progress=False, save_every=1, output_dir=str(tmp_path / "run"))
    train_organ(not_hub.extract_organ(donor, layer_range=(2, 4)), donor, blocks, **common)
    checkpoint = max((tmp_path / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))  # newest
    assert (checkpoint / damaged).is_file(), sorted(p.name for p in checkpoint.iterdir())
    (checkpoint / damaged).write_bytes(b"\x00garbage{")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    before = {k: v.clone() for k, v in organ.state_dict().items()}
    with pytest.raises(CheckpointFormatError, match=f"{checkpoint.name}.*cannot be read"):
        train_organ(organ, donor, blocks, **common)
    assert all(torch.equal(v, before[k]) for k, v in organ.state_dict().items())


# ------------------------------------------------------------------------------------------- run dirs and adapters


def test_a_second_run_in_a_run_dir_in_use_is_refused_at_once(tmp_path, blocks):
    import fcntl

    from not_hub.errors import RunDirInUseError

    run = tmp_path / "run"
    run.mkdir()
    holder = open(run / ".lock", "a+")  # another training process holds the run dir
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    donor = tiny_model("llama")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    kwargs = dict(max_steps=1, batch_size=4, progress=False, output_dir=str(run))
    try:
        with pytest.raises(RunDirInUseError, match="in use by another training process"):
            train_organ(organ, donor, blocks, **kwargs)
        assert sorted(p.name for p in run.iterdir()) == [".lock"] and not organ.config.training
    finally:
        holder.close()
    train_organ(organ, donor, blocks, **kwargs)  # released: it trains
    assert organ.config.training["steps"] == 1


def test_a_missing_adapter_folder_is_named_and_a_bad_card_header_writes_nothing(tmp_path):
    from peft import LoraConfig, get_peft_model

    from not_hub.errors import AdapterNotFoundError

    with pytest.raises(AdapterNotFoundError, match="does not exist"):
        not_hub.check_adapter(tiny_model("llama"), tmp_path / "no-such-adapter")
    with pytest.raises(AdapterNotFoundError, match="does not exist"):
        not_hub.load_adapter(tiny_model("llama"), "./no-such-adapter")
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: [apache\n---\nmy notes\n")
    before = sorted(p.name for p in folder.iterdir())
    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(CheckpointFormatError, match="YAML header"):
        not_hub.save_adapter(peft_model, folder)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert (folder / "README.md").read_text() == "---\nlicense: [apache\n---\nmy notes\n"


@pytest.mark.parametrize(
    "change, error, words",
    [
        (
            lambda c: c["signature"].update(
                decoder_layer_class="transformers.models.llama.modeling_llama:LlamaForCausalLM"
            ),
            "UnsafeCheckpointError",
            "whole model",
        ),
        (
            lambda c: c["signature"].update(decoder_layer_class="transformers.models.llama.modeling_llama:LlamaMLP"),
            "UnsafeCheckpointError",
            "not a decoder layer",
        ),
        (lambda c: c["signature"].update(hidden_size="64"), "CheckpointFormatError", "hidden_size"),
        (lambda c: c["signature"].update(hidden_size=-1), "CheckpointFormatError", "hidden_size"),
    ],
    ids=["model-class", "mlp-class", "hidden-size-string", "hidden-size-negative"],
)
def test_an_organ_config_naming_a_model_class_or_a_string_size_is_refused(tmp_path, change, error, words):
    from not_hub import errors

    not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3)).save_pretrained(tmp_path / "organ")
    path = tmp_path / "organ" / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    with pytest.raises(getattr(errors, error), match=words):
        not_hub.OrganModel.from_pretrained(tmp_path / "organ", verify_integrity=False)


# ----------------------------------------------------------------------------------------------- full disks, signals


def test_a_full_checkpoint_disk_mid_training_is_a_named_error_with_no_half_checkpoint(tmp_path, blocks, monkeypatch):
    from not_hub.errors import OutputPathError

    donor = tiny_model("llama")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # what torch.save raises when the disk fills while it writes
        if str(f).endswith("optimizer.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")  # fmt: skip
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputPathError, match="could not write a checkpoint"):
        train_organ(organ, donor, blocks, method="standalone", max_steps=2, save_every=1, batch_size=4,
                    progress=False, output_dir=str(tmp_path / "run"))  # fmt: skip
    assert not list((tmp_path / "run").glob("checkpoint-*")) and not organ.config.training


def test_a_full_cache_disk_costs_speed_not_the_run(blocks, monkeypatch, caplog):
    import os

    from not_hub import prefix_cache

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prefix_cache.os, "pwrite", full)
    donor = tiny_model("llama")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    with caplog.at_level("WARNING", logger="not_hub.prefix_cache"):
        metrics = train_organ(
            organ, donor, blocks, max_steps=3, batch_size=8, progress=False, cache_memory_limit=0
        )  # fmt: skip  (everything would go to disk)
    assert metrics.steps == 3 and organ.config.training["prefix_cache"]["uncached"] > 0
    assert any("caching no more on disk" in r.message for r in caplog.records)
    assert os.pwrite is full


def test_a_save_leftover_whose_process_id_was_reused_is_removed(tmp_path):
    import os
    import subprocess
    import sys

    from not_hub.atomic import _TMP_TAG, replace_folder

    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stale = tmp_path / f".organ{_TMP_TAG}{later.pid}-abc"  # left by a killed save whose pid `later` now has
        stale.mkdir()
        os.utime(stale, (1_000_000_000, 1_000_000_000))  # made long before that process started
        fresh = tmp_path / f".organ{_TMP_TAG}{later.pid}-def"  # made by that very process (after it started)
        fresh.mkdir()
        replace_folder(tmp_path / "organ", lambda folder: (folder / "x").write_text("x"))
        assert not stale.exists() and fresh.exists() and (tmp_path / "organ" / "x").is_file()
    finally:
        later.kill()


def test_ctrl_c_while_the_cli_starts_is_one_line(tmp_path):
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, not_hub_launcher; sys.exit(not_hub_launcher.main())", "--version"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(0.4)  # inside the imports of torch and transformers (seconds)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "interrupted" and "Traceback" not in err, (out, err)


def test_a_missing_revision_is_said_as_such_not_as_a_missing_organ_set_file(local_hub, tmp_path):  # noqa: F811
    run_scenario(
        local_hub,
        tmp_path,
        """
        from not_hub.errors import OrganNotFoundError
        not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3)).push_to_hub("user/revisioned-organ")
        try:
            not_hub.load_grafted("user/revisioned-organ", revision="no-such-branch", recipient="unused")
        except OrganNotFoundError as err:
            assert "no revision 'no-such-branch'" in str(err) and "organ_set" not in str(err), err
        else:
            raise AssertionError("a missing revision loaded")
        """,
    )
