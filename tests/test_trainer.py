"""Organs in the field's trainers, corpora of any size, budgets that hold (offline, CPU, tiny models)."""

import json
import math

import pytest
import torch
from tiny_models import tiny_input_ids, tiny_model
from tiny_tokenizer import code_documents, tiny_tokenizer
from transformers import PreTrainedModel, Trainer, TrainingArguments

import not_hub
from not_hub.data import make_blocks, split_documents, stream_blocks, stream_documents
from not_hub.errors import InvalidArgumentError, TransplantStateError
from not_hub.training import fit_parameters, train_organ


@pytest.fixture(scope="module")
def blocks():
    return make_blocks(split_documents(code_documents(), seed=0), tiny_tokenizer(), 32)


# ------------------------------------------------------------------------------------ get_organ_model + Trainer


def test_a_grafted_model_trains_in_transformers_trainer_and_unloads_as_it_was(blocks, hash_state, tmp_path):
    model = tiny_model("llama")
    before = hash_state(model)
    flags = [p.requires_grad for p in model.parameters()]
    organ = not_hub.extract_organ(tiny_model("llama"), layer_range=(2, 4))
    grafted = not_hub.get_organ_model(organ, model)
    assert grafted is model and isinstance(grafted, PreTrainedModel)
    trainable, total = not_hub.trainable_parameters(grafted)
    assert trainable == sum(p.numel() for p in organ.parameters()) and trainable < total
    args = TrainingArguments(
        str(tmp_path), max_steps=3, learning_rate=3e-3, per_device_train_batch_size=8, report_to="none",
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=grafted, args=args, train_dataset=blocks.train, data_collator=not_hub.collate_blocks).train()
    ids = tiny_input_ids()
    with torch.no_grad():
        trained_logits = grafted(ids).logits
    trained = not_hub.unload_organ(grafted)
    assert hash_state(model) == before and [p.requires_grad for p in model.parameters()] == flags
    assert any(
        not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), organ.state_dict().values(), strict=True)
    )
    trained.save_pretrained(tmp_path / "organ")
    fresh = tiny_model("llama")
    with not_hub.OrganModel.from_pretrained(tmp_path / "organ").transplanted(fresh):
        with torch.no_grad():
            assert torch.equal(fresh(ids).logits, trained_logits)
    with pytest.raises(TransplantStateError, match="get_organ_model"):
        not_hub.unload_organ(model)


def test_a_failed_graft_leaves_the_model_as_it_was(hash_state):
    model = tiny_model("llama")
    before = hash_state(model)
    organ = not_hub.extract_organ(tiny_model("llama"), layer_range=(2, 4))
    with pytest.raises(not_hub.errors.InvalidPositionError):
        not_hub.get_organ_model(organ, model, position=99)
    assert hash_state(model) == before and all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------- budgets and schedule


def test_a_token_budget_becomes_steps_and_the_schedule_completes_within_it(blocks):
    donor = tiny_model("llama")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    metrics = train_organ(
        organ, donor, blocks, method="standalone", epochs=50, max_tokens=3000, batch_size=8, eval_every=1,
        progress=False,
    )  # fmt: skip
    assert metrics.steps == math.ceil(3000 / (8 * 32)) and metrics.tokens_seen == metrics.steps * 8 * 32
    assert metrics.lr == not_hub.DEFAULT_LR["standalone"]  # the method's default, not one rate for all
    lrs = [h["lr"] for h in metrics.history[1:]]  # the rate after each step
    assert max(lrs) == pytest.approx(metrics.lr) and lrs[-1] == 0.0  # warmup done, decayed to 0 at the budget


def test_a_time_budget_lays_the_schedule_over_the_budget(blocks):
    donor = tiny_model("llama")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    metrics = train_organ(organ, donor, blocks, method="in_situ", epochs=1000, max_seconds=2.0, eval_every=5,
                          batch_size=8, progress=False)  # fmt: skip
    lrs = [h["lr"] for h in metrics.history[1:]]
    assert metrics.steps > 10 and max(lrs) > 0.5 * metrics.lr  # it left warmup ...
    assert lrs[-1] < 0.2 * metrics.lr  # ... and decayed by the end of the budget, not of 1,000 epochs


def test_validation_at_training_time_marks_records_a_learning_curve(blocks):
    donor = tiny_model("llama")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    # Marks far below a step's time are all passed by the first step: one validation there, none after until the end.
    metrics = train_organ(organ, donor, blocks, method="in_situ", max_steps=4, eval_every=1000, batch_size=8,
                          eval_at_seconds=[1e-7, 2e-7], progress=False)  # fmt: skip
    assert [h["step"] for h in metrics.history] == [0, 1, 4]
    assert [h["tokens_seen"] for h in metrics.history] == [0, 8 * 32, 4 * 8 * 32]
    times = [h["training_s"] for h in metrics.history]
    assert times == sorted(times) and times[-1] > times[0]
    with pytest.raises(InvalidArgumentError, match="eval_at_seconds"):
        train_organ(organ, donor, blocks, max_steps=1, eval_at_seconds=[120, 60])


def test_gradient_checkpointing_and_trainer_args_pass_through_and_leave_the_model_as_found(blocks, hash_state):
    results = []
    for extra in ({}, {"gradient_checkpointing": True}):
        donor = tiny_model("llama")
        before = hash_state(donor)
        params = list(donor.model.layers[3].parameters())
        fit_parameters(
            donor, params, blocks, not_hub.OrganTrainingArguments(max_steps=2, lr=3e-3, progress=False, **extra)
        )
        assert not any(getattr(m, "gradient_checkpointing", False) for m in donor.modules())
        assert donor.config.use_cache == tiny_model("llama").config.use_cache
        results.append([p.detach().clone() for p in params])
        assert hash_state(donor) != before  # layer 3 trained
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # recomputation changes memory, not the result
    donor = tiny_model("llama")
    layer = donor.model.layers[3]
    start = layer.mlp.up_proj.weight.detach().clone()
    args = not_hub.OrganTrainingArguments(max_steps=1, lr=0.5, progress=False, max_grad_norm=None,
                                          warmup_ratio=0.0, trainer_args={"optim": "sgd"})  # fmt: skip
    fit_parameters(donor, list(layer.parameters()), blocks, args)
    # plain SGD with lr 0.5: the step is -0.5 * grad, far larger than any Adam step (<= lr per weight) would be
    assert (layer.mlp.up_proj.weight - start).abs().max() > 0


def test_a_finished_run_asked_again_returns_its_weights_without_training(blocks, tmp_path):
    donor = tiny_model("llama")
    data = not_hub.BlockData(blocks.train, None, blocks.description)  # no validation: the last weights are kept
    kwargs = dict(method="standalone", max_steps=3, lr=3e-3, batch_size=8, progress=False, output_dir=str(tmp_path))
    first = not_hub.extract_organ(donor, layer_range=(2, 4))
    train_organ(first, donor, data, **kwargs)
    again = not_hub.extract_organ(donor, layer_range=(2, 4))
    metrics = train_organ(again, donor, data, **kwargs)
    assert metrics.steps == 3
    for name, tensor in first.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor)


def test_a_restart_with_resume_false_never_hands_one_run_another_runs_weights(blocks, tmp_path, monkeypatch):
    donor = tiny_model("llama")
    run = str(tmp_path / "run")
    kwargs = dict(method="standalone", max_steps=4, save_every=2, batch_size=8, progress=False, output_dir=run)
    train_organ(not_hub.extract_organ(donor, layer_range=(2, 4)), donor, blocks, lr=3e-3, **kwargs)  # run A
    assert (tmp_path / "run" / "checkpoint-4").is_dir()

    import not_hub.training as training

    def killed(*args, **kw):
        raise KeyboardInterrupt  # run B dies right after it claimed the run dir, before any checkpoint

    monkeypatch.setattr(training, "run_trainer", killed)
    with pytest.raises(KeyboardInterrupt):
        train_organ(not_hub.extract_organ(donor, layer_range=(2, 4)), donor, blocks, lr=1e-2, resume=False, **kwargs)
    monkeypatch.undo()
    identity = json.loads((tmp_path / "run" / "run_identity.json").read_text())
    assert identity["hyper_parameters"]["lr"] == 1e-2 and not list((tmp_path / "run").glob("checkpoint-*"))
    b_again = not_hub.extract_organ(donor, layer_range=(2, 4))
    train_organ(b_again, donor, blocks, lr=1e-2, **kwargs)  # resumes B (from nothing), not A
    b_fresh = not_hub.extract_organ(donor, layer_range=(2, 4))
    train_organ(b_fresh, donor, blocks, lr=1e-2, **{**kwargs, "output_dir": None})
    for name, tensor in b_fresh.state_dict().items():
        torch.testing.assert_close(b_again.state_dict()[name], tensor, rtol=1e-6, atol=1e-7)


# -------------------------------------------------------------------------------------------------- streaming


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    with path.open("w") as f:
        for doc in code_documents(3000):
            f.write(json.dumps({"text": doc}) + "\n")
    return path


def test_a_stream_is_split_by_document_and_trains_in_one_pass_under_a_token_budget(corpus):
    tok = tiny_tokenizer()
    train_docs = {ex["text"] for ex in stream_documents(corpus, bucket="train")}
    valid_docs = {ex["text"] for ex in stream_documents(corpus, bucket="validation")}
    test_docs = {ex["text"] for ex in stream_documents(corpus, bucket="test")}
    assert not (train_docs & valid_docs) and not (train_docs & test_docs) and not (valid_docs & test_docs)
    assert len(train_docs) + len(valid_docs) + len(test_docs) == 3000 and 200 < len(valid_docs) < 400
    data = stream_blocks(corpus, tok, 32, max_validation_blocks=8)
    assert data.streamed and len(data.validation) == 8 and data.block_size == 32
    donor = tiny_model("llama")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    with pytest.raises(InvalidArgumentError, match="max_tokens"):
        train_organ(organ, donor, data, progress=False)  # a stream has no length to lay a schedule on
    metrics = train_organ(organ, donor, data, max_tokens=20 * 8 * 32, batch_size=8, eval_every=10, progress=False)
    assert metrics.steps == 20 and metrics.tokens_seen == 20 * 8 * 32
    assert metrics.best_validation_loss < metrics.history[0]["validation_loss"]
    assert organ.config.training["data"]["streamed"] is True


def test_a_stream_ends_training_after_one_pass(tmp_path):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in code_documents(300)))
    data = stream_blocks(path, tiny_tokenizer(), 32, validation=0.0, test=0.0)
    n_blocks = sum(1 for _ in data.train)
    donor = tiny_model("llama")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    metrics = train_organ(organ, donor, data, max_seconds=600, batch_size=8, progress=False)
    assert metrics.steps == math.ceil(n_blocks / 8) and metrics.tokens_seen == n_blocks * 32  # once, then stop
