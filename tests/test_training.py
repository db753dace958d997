"""Training, recovery, bridges and evaluation on tiny models (offline, CPU)."""

import copy
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import warm_python
from safetensors.torch import load_file
from tiny_models import tiny_input_ids, tiny_model
from tiny_tokenizer import code_documents, tiny_tokenizer

import not_hub
from not_hub.data import load_documents, make_blocks, pack_blocks, split_documents
from not_hub.errors import InvalidModeError
from not_hub.evaluation import add_evaluation_result, perplexity, position_sweep
from not_hub.shells import standalone_shell
from not_hub.training import recover, train_bridges, train_organ, validation_loss

FIXTURES = Path(__file__).parent / "fixtures"
FAST = dict(epochs=2, lr=3e-3, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def splits():
    return split_documents(code_documents(), seed=0)


@pytest.fixture(scope="module")
def blocks(splits, tokenizer):
    return make_blocks(splits, tokenizer, 32)


def params_of(layers):
    return {f"{i}.{n}": p.detach().clone() for i, layer in enumerate(layers) for n, p in layer.named_parameters()}


# ----------------------------------------------------------------------------------------------------------- data


def test_splits_are_disjoint_by_document_and_reproducible():
    docs = code_documents()
    a, b = split_documents(docs, seed=3), split_documents(list(reversed(docs)), seed=3)
    assert (a.train, a.validation, a.test) == (b.train, b.validation, b.test)  # order of input does not matter
    assert not set(a.train) & set(a.validation) and not set(a.train) & set(a.test)
    assert len(a.validation) == len(a.test) == 24 and len(a.train) == 192
    assert split_documents(docs, seed=4).test != a.test


def test_packing_makes_equal_blocks_within_a_split(splits, tokenizer):
    ds = pack_blocks(splits.train, tokenizer, 16)
    n_tokens = sum(len(tokenizer(d)["input_ids"]) + 1 for d in splits.train)
    assert len(ds) == n_tokens // 16 and ds[0]["input_ids"].shape == (16,)


def test_load_documents_from_files_folders_and_lists(tmp_path):
    (tmp_path / "a.txt").write_text("first para\n\nsecond para\n")
    (tmp_path / "b.txt").write_text("line one\nline two\n")
    (tmp_path / "c.jsonl").write_text('{"text": "x y"}\n{"text": "z"}\n')
    assert load_documents(tmp_path / "a.txt") == ["first para", "second para"]
    assert load_documents(tmp_path / "b.txt", unit="line") == ["line one", "line two"]
    assert sorted(load_documents(tmp_path)) == sorted(["first para\n\nsecond para", "line one\nline two"])
    assert load_documents(tmp_path / "c.jsonl") == ["x y", "z"]
    assert load_documents(["  a ", "", "b"]) == ["a", "b"]
    with pytest.raises(FileNotFoundError):
        load_documents(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------------------------- training


def test_standalone_training_lowers_wrapper_loss_and_freezes_the_donor(blocks, hash_state):
    donor = tiny_model("llama")
    flags = [p.requires_grad for p in donor.parameters()]
    before = hash_state(donor)
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    shell = standalone_shell(organ, donor)
    loss_before = validation_loss(shell, blocks.train)
    metrics = train_organ(organ, donor, blocks, method="standalone", **FAST)
    assert validation_loss(standalone_shell(organ, donor), blocks.train) < loss_before - 0.5
    assert hash_state(donor) == before  # frozen weights bit-identical
    assert [p.requires_grad for p in donor.parameters()] == flags
    training = organ.config.training
    assert training["method"] == "standalone" and training["steps"] == metrics.steps == 2 * math.ceil(
        len(blocks.train) / 8
    )
    assert training["tokens_seen"] == 2 * len(blocks.train) * 32 and training["data"]["block_size"] == 32
    assert training["best_validation_loss"] <= training["history"][0]["validation_loss"]


def test_in_situ_training_changes_only_the_organ(blocks, hash_state):
    donor = tiny_model("llama")
    before = hash_state(donor)
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    start = params_of(organ.layers)
    train_organ(organ, donor, blocks, method="in_situ", **FAST)
    assert hash_state(donor) == before
    after = params_of(organ.layers)
    assert all(not torch.equal(start[k], after[k]) for k in start if "norm" not in k)
    assert organ.config.training["method"] == "in_situ"
    with pytest.raises(not_hub.errors.InvalidArgumentError, match="method=.magic."):
        train_organ(organ, donor, blocks, method="magic")


def test_recovery_touches_only_the_organ_and_its_neighbours(blocks, hash_state):
    recipient = tiny_model("llama")
    before = hash_state(recipient)
    organ = not_hub.extract_organ(tiny_model("llama", seed=9), layer_range=(2, 4))
    record = organ.transplant_into(recipient, position=2, mode="insert")  # organ at [2, 4) of 8
    stack = recipient.model.layers
    snapshot = {i: params_of([stack[i]]) for i in range(len(stack))}
    frozen = {n: p.detach().clone() for n, p in recipient.named_parameters() if not n.startswith("model.layers.")}
    recover(recipient, record, blocks, radius=1, **FAST)
    changed = {
        i
        for i in range(len(stack))
        if any(not torch.equal(v, params_of([stack[i]])[k]) for k, v in snapshot[i].items())
    }
    assert changed == {1, 2, 3, 4}  # organ [2, 4) and one neighbour on each side
    for n, p in recipient.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert recipient.config.transplants[0]["recovery"]["radius"] == 1
    record.explant()
    assert hash_state(recipient) == before  # neighbours restored too


def test_untrained_bridges_change_nothing_and_only_bridges_train(blocks):
    donor = tiny_model("llama")
    organ = not_hub.extract_organ(tiny_model("llama", seed=2), layer_range=(1, 3))
    ids = tiny_input_ids()
    plain = copy.deepcopy(donor)
    organ.transplant_into(plain, position=3, mode="insert")
    record = organ.transplant_into(donor, position=3, mode="bridge")
    assert torch.equal(donor(ids).logits, plain(ids).logits)
    organ_before = params_of([layer.layer if hasattr(layer, "layer") else layer for layer in record.layers])
    bridges_before = params_of(record.bridges)
    with pytest.raises(InvalidModeError, match="mode='insert'"):
        train_bridges(plain, not_hub.transplants_of(plain)[0], blocks)
    train_bridges(donor, record, blocks, **FAST)
    organ_after = params_of([layer.layer for layer in (record.layers[0], record.layers[-1])])
    assert all(torch.equal(organ_before[k], organ_after[k]) for k in organ_after)
    assert any(not torch.equal(v, params_of(record.bridges)[k]) for k, v in bridges_before.items())


def test_trained_bridges_are_saved_and_loaded_with_the_organ(blocks, tmp_path):
    donor = tiny_model("llama")
    organ = not_hub.extract_organ(tiny_model("llama", seed=2), layer_range=(1, 3))
    record = organ.transplant_into(donor, position=3, mode="bridge")
    train_bridges(donor, record, blocks, **FAST)
    ids = tiny_input_ids()
    expected = donor(ids).logits
    record.to_organ().save_pretrained(tmp_path)
    record.explant()
    reloaded = not_hub.OrganModel.from_pretrained(tmp_path)
    assert reloaded.config.bridges and "bridge_in.weight" in reloaded.config.tensor_sha256
    reloaded.transplant_into(donor, position=3, mode="bridge")
    assert torch.equal(donor(ids).logits, expected)


@pytest.mark.parametrize("method", ["standalone", "in_situ"])  # in situ: with the cached prefix
def test_resume_after_kill_equals_uninterrupted_run(tmp_path, method):
    sys.path.insert(0, str(FIXTURES))
    from train_run import run

    run(tmp_path / "reference", method=method)  # uninterrupted, in this process
    flags = ["--slow"] + (["--in-situ"] if method == "in_situ" else [])
    proc = warm_python.start([sys.executable, str(FIXTURES / "train_run.py"), str(tmp_path / "killed"), *flags])
    deadline = time.time() + 240
    run_dir = tmp_path / "killed" / "run"
    while time.time() < deadline and not list(run_dir.glob("checkpoint-[5-9]")) and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "organ-rank0.safetensors").exists()
    run(tmp_path / "killed", method=method)  # resumes from the newest checkpoint
    reference = load_file(tmp_path / "reference" / "organ-rank0.safetensors")
    resumed = load_file(tmp_path / "killed" / "organ-rank0.safetensors")
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        if name.startswith("routing."):  # the routing signature describes the tokens of the session that ended the
            continue  # run (fewer after a resume): statistics of the data, not weights
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-6, atol=1e-7)


def test_two_process_training_agrees(tmp_path):
    # accelerate 1.x: `--cpu` alone starts one process without MPI; two CPU processes need the torchrun launcher
    # (`--multi_gpu`) with ACCELERATE_USE_CPU=1, which gives DistributedType.MULTI_CPU over gloo.
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        str(FIXTURES / "train_run.py"),
        str(tmp_path),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    out = warm_python.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    first_error = [line for line in out.stderr.splitlines() if "[rank0]" in line or "Error" in line][:40]
    assert out.returncode == 0, "\n".join(first_error) + "\n...\n" + out.stderr[-2000:]
    rank0, rank1 = (load_file(tmp_path / f"organ-rank{r}.safetensors") for r in (0, 1))
    seen = [json.loads((tmp_path / f"processes-rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1] and seen[0]["num_processes"] == 2
    # the steps are laid out for two processes: three epochs of the blocks, all processes together (a process that
    # took itself for the only one laid out twice the steps, and saw six)
    assert seen[0]["epochs"] == 3
    assert seen[0]["tokens_seen"] <= 3 * (seen[0]["train_tokens"] + 2 * 4 * 32)  # each epoch ends on a whole step
    assert seen[0]["tokens_seen"] >= 3 * seen[0]["train_tokens"]
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    initial = not_hub.extract_organ(tiny_model("llama"), layer_range=(2, 4)).state_dict()
    assert any(not torch.equal(initial[k], rank0[k]) for k in rank0)  # it did train


# ----------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def _direct_nll(model, docs):
    total, count = 0.0, 0
    for doc in docs:
        ids = torch.tensor(doc)[None]
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        total -= float(logp.gather(1, ids[0, 1:, None]).sum())
        count += len(doc) - 1
    return total / count, count


@pytest.mark.parametrize("max_length,stride", [(64, 32), (8, 8), (8, 3)])
def test_perplexity_matches_direct_mean_nll(max_length, stride):
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 17, 2, 30)]
    result = perplexity(model, docs, max_length=max_length, stride=stride)
    nll, count = _direct_nll(model, docs)
    assert result.tokens == count == 4 + 16 + 1 + 29
    if max_length >= 30:  # one window per document: exactly the direct computation
        assert result.nll == pytest.approx(nll, rel=1e-6)
    else:  # shorter windows: every token still scored once, perplexity consistent with the NLL
        assert math.isfinite(result.nll) and result.perplexity == pytest.approx(math.exp(result.nll))


def test_perplexity_windows_score_each_token_once_with_in_document_context():
    model = tiny_model("llama")
    doc = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    result = perplexity(model, [doc], max_length=8, stride=4)
    # Manual: windows [0,8) scores 1..7, [4,12) scores 8..11, [8,16) 12..15, [12,20) 16..19.
    total = 0.0
    for begin, first, end in [(0, 1, 8), (4, 8, 12), (8, 12, 16), (12, 16, 20)]:
        ids = torch.tensor(doc[begin:end])[None]
        logp = torch.log_softmax(model(ids).logits[0], dim=-1)
        total -= sum(float(logp[p - begin - 1, doc[p]]) for p in range(first, end))
    assert result.tokens == 19 and result.nll == pytest.approx(total / 19, rel=1e-6)


def test_position_sweep_covers_positions_and_restores_recipient(splits, tokenizer, blocks, hash_state):
    recipient = tiny_model("llama")
    before = hash_state(recipient)
    organ = not_hub.extract_organ(recipient, layer_range=(2, 4))
    sweep = position_sweep(
        organ,
        recipient,
        splits.test[:6],
        tokenizer=tokenizer,
        modes=("replace", "insert"),
        max_length=32,
        progress=False,
    )
    assert [r["position"] for r in sweep.rows if r["mode"] == "replace"] == list(range(5))
    assert [r["position"] for r in sweep.rows if r["mode"] == "insert"] == list(range(7))
    identity = next(r for r in sweep.rows if r["mode"] == "replace" and r["position"] == 2)
    assert identity["perplexity"] == pytest.approx(sweep.baseline.perplexity, rel=1e-6)
    summary = sweep.summary()
    values = [r["perplexity"] for r in sweep.rows if r["mode"] == "replace"]
    assert summary["replace"]["mean"] == pytest.approx(sum(values) / len(values))
    assert hash_state(recipient) == before
    recovered = position_sweep(
        organ,
        recipient,
        splits.test[:6],
        tokenizer=tokenizer,
        positions=[0],
        max_length=32,
        recovery_data=blocks,
        recovery_kwargs=dict(epochs=1, lr=3e-3),
        progress=False,
    )
    assert "recovery_wall_clock_s" in recovered.rows[0]
    assert hash_state(recipient) == before
    add_evaluation_result(
        organ.config,
        dataset="toy",
        value=recovered.rows[0]["perplexity"],
        baseline=recovered.baseline.perplexity,
        position=0,
        mode="replace",
        recovered=True,
    )
    assert organ.config.evaluation["results"][0]["recovered"] is True


def test_standalone_wrapper_shares_the_donor_weights():
    """The wrapper holds no second copy of the donor's frozen weights: every tensor is the donor's or the organ's."""
    donor = tiny_model("llama")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    shell = standalone_shell(organ, donor)
    owned = {p.data_ptr() for p in donor.parameters()} | {p.data_ptr() for p in organ.parameters()}
    assert {p.data_ptr() for p in shell.parameters()} <= owned
    assert shell.get_input_embeddings().weight is donor.get_input_embeddings().weight
    assert len(shell.model.layers) == 2 and len(donor.model.layers) == 6
    assert sum(p.numel() for p in shell.parameters()) < sum(p.numel() for p in donor.parameters())


def test_wall_clock_budget_stops_training(blocks):
    donor = tiny_model("llama")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    before = params_of(organ.layers)
    with pytest.raises(not_hub.errors.InvalidArgumentError, match="max_seconds"):  # a 0 s budget trains nothing
        train_organ(organ, donor, blocks, method="standalone", epochs=50, max_seconds=0.0, progress=False)
    assert all(torch.equal(v, params_of(organ.layers)[k]) for k, v in before.items()) and organ.config.training is None
    metrics = train_organ(
        organ, donor, blocks, method="standalone", epochs=50, max_seconds=0.5, lr=3e-3, batch_size=8, progress=False
    )
    assert 0 < metrics.steps < 50 * math.ceil(len(blocks.train) / 8)
    assert metrics.wall_clock_s - metrics.validation_s < 0.5 + 2.0  # stops within a step of the budget
