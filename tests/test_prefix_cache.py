"""In-situ training with the frozen prefix kept as training first visits each block: same losses and weights as
the uncached run, no pass before the first step, bounded memory and disk, nothing left behind."""

import os
import time

import datasets
import pytest
import torch
from tiny_models import tiny_model
from tiny_tokenizer import code_documents, tiny_tokenizer

import not_hub
from not_hub.data import BlockData, make_blocks, split_documents
from not_hub.errors import InvalidArgumentError
from not_hub.prefix_cache import CachedPrefixModel, PrefixCache
from not_hub.training import train_organ


@pytest.fixture(scope="module")
def blocks():
    return make_blocks(split_documents(code_documents(), seed=0), tiny_tokenizer(), 32)


def every_block(blocks):
    return [blocks.train[:]["input_ids"], blocks.validation[:]["input_ids"]]


NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}


def _train(family, layer_range, blocks, **kwargs):
    donor = tiny_model(family, **NO_DROPOUT.get(family, {}))
    organ = not_hub.extract_organ(donor, layer_range=layer_range)
    metrics = train_organ(
        organ, donor, blocks, method="in_situ", max_steps=4, lr=3e-3, batch_size=8, eval_every=2, progress=False,
        **kwargs,
    )  # fmt: skip
    return organ, metrics


@pytest.mark.parametrize(
    "family, layer_range",
    [("llama", (2, 4)), ("llama", (4, 6)), ("gemma2", (2, 4)), ("gpt2", (3, 5)), ("falcon", (2, 4))],
    ids=["llama-middle", "llama-tail", "gemma2-sliding", "gpt2-positions", "falcon-tuple"],
)
def test_cached_in_situ_training_equals_uncached(family, layer_range, blocks):
    cached, m_cached = _train(family, layer_range, blocks)
    plain, m_plain = _train(family, layer_range, blocks, cache_prefix=False)
    assert cached.config.training["prefix_cache"]["layers"] == [0, layer_range[0]]
    assert plain.config.training["prefix_cache"] is None
    assert m_cached.steps == m_plain.steps == 4
    # Trainer scales the loss by the tokens it counts; a stand-in that Trainer did not know as a causal LM once
    # counted T instead of T-1 per block (a 3% larger gradient), which only these tolerances caught.
    for a, b in zip(m_cached.history, m_plain.history, strict=True):
        assert a["validation_loss"] == pytest.approx(b["validation_loss"], rel=1e-5, abs=1e-6)
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(cached.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)
    initial = not_hub.extract_organ(tiny_model(family, **NO_DROPOUT.get(family, {})), layer_range=layer_range)
    initial = initial.state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in cached.state_dict().items())  # it trained


def test_cached_model_reproduces_the_donor_logits(blocks):
    donor = tiny_model("llama")
    ids = blocks.validation[:4]["input_ids"]
    cache = PrefixCache.build(donor, 3, [ids])
    assert cache.bytes_per_token == donor.config.hidden_size * 4 and cache.nbytes == 4 * 32 * cache.bytes_per_token
    with torch.no_grad():
        assert torch.equal(CachedPrefixModel(donor, cache)(input_ids=ids).logits, donor(ids).logits)


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_past_the_memory_limit_blocks_go_to_an_unnamed_file_then_are_recomputed(blocks, tmp_path, hash_state):
    donor = tiny_model("llama")
    before = hash_state(donor)
    ids = blocks.validation[:4]["input_ids"]
    row = ids.shape[1] * donor.config.hidden_size * 4
    in_memory = PrefixCache.build(donor, 3, [ids])
    on_disk = PrefixCache.build(donor, 3, [ids], memory_limit=row, cache_dir=tmp_path)
    nowhere = PrefixCache.build(donor, 3, [ids], memory_limit=0, disk_limit=row)
    assert (in_memory.memory_bytes, in_memory.disk_bytes) == (4 * row, 0)
    assert (on_disk.memory_bytes, on_disk.disk_bytes) == (row, 3 * row)
    assert (nowhere.disk_bytes, nowhere.uncached) == (row, 3)
    assert list(tmp_path.iterdir()) == []  # the file has no name: nothing to clean up, even after a crash
    for cache in (on_disk, nowhere):
        assert torch.equal(in_memory.lookup(ids[[2, 0, 3]]), cache.lookup(ids[[2, 0, 3]]))
    files = _open_files()
    on_disk.close()
    assert _open_files() == files - 1 and on_disk.nbytes == 0
    organ, metrics = _train("llama", (2, 4), blocks, cache_memory_limit=0, cache_disk_limit=0)
    stats = organ.config.training["prefix_cache"]
    assert stats["bytes"] == 0 and stats["uncached"] == stats["misses"] > 0 and stats["hits"] == 0
    reference, _ = _train("llama", (2, 4), blocks)
    assert reference.config.training["prefix_cache"]["hits"] > 0  # validation blocks come back every evaluation
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(organ.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)
    assert hash_state(donor) == before


def test_the_cache_fills_as_training_first_visits_each_block(blocks):
    donor = tiny_model("llama")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    n = len(blocks.train)
    train_organ(organ, donor, blocks, method="in_situ", epochs=2, lr=3e-3, batch_size=8, progress=False)
    stats = organ.config.training["prefix_cache"]
    n_val = len(blocks.validation)
    # each block computed once (on its first visit), answered from the cache on every later one
    assert stats["misses"] == stats["blocks"] == n + n_val
    assert stats["hits"] == n + 2 * n_val  # epoch 2; validation after epoch 1 and epoch 2


def test_thousands_of_blocks_train_from_the_first_second_and_hold_the_budget():
    donor = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    train = datasets.Dataset.from_dict({"input_ids": torch.randint(0, 128, (5000, 32), generator=g).tolist()})
    valid = datasets.Dataset.from_dict({"input_ids": torch.randint(0, 128, (8, 32), generator=g).tolist()})
    data = BlockData(train.with_format("torch"), valid.with_format("torch"), {"block_size": 32})
    organ = not_hub.extract_organ(donor, layer_range=(4, 6))  # a deep slot: the most prefix to compute
    files = _open_files()
    t0 = time.perf_counter()
    metrics = train_organ(organ, donor, data, method="in_situ", max_seconds=3.0, batch_size=8, progress=False)
    elapsed = time.perf_counter() - t0
    assert metrics.first_step_s < 1.0  # no pass over the 5,000 blocks before the first step
    assert 0 < metrics.steps < len(train) // 8
    assert metrics.wall_clock_s - metrics.validation_s < 3.0 + 1.0  # held within a step of the budget
    assert elapsed < 3.0 + metrics.validation_s + 5.0  # set-up and the final validation only
    assert organ.config.training["prefix_cache"]["misses"] == metrics.steps * 8 + 8
    assert _open_files() == files  # the cache is closed with the run


def test_dropout_below_the_organ_falls_back_to_the_uncached_run(blocks):
    donor = tiny_model("gpt2")  # resid/embd/attn dropout 0.1: a cached prefix could not reproduce the run
    organ = not_hub.extract_organ(donor, layer_range=(3, 5))
    train_organ(organ, donor, blocks, method="in_situ", max_steps=1, batch_size=8, progress=False)
    assert "dropout below the organ" in organ.config.training["prefix_cache"]["skipped"]


def test_recovered_method_grows_the_organ_into_the_block_it_carries(blocks, hash_state, tmp_path):
    donor = tiny_model("llama")
    before = hash_state(donor)
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    metrics = train_organ(organ, donor, blocks, method="recovered", max_steps=4, lr=3e-3, batch_size=8, progress=False)
    assert metrics.steps == 4 and {h["phase"] for h in metrics.history} == {"standalone", "recovery"}
    assert organ.config.layer_roles == ["neighbour", "organ", "organ", "neighbour"]
    assert organ.config.default_transplant == {"mode": "splice", "position": 1, "remove": 4}
    assert organ.config.training["method"] == "recovered" and hash_state(donor) == before
    organ.save_pretrained(tmp_path / "organ")
    pulled = not_hub.OrganModel.from_pretrained(tmp_path / "organ")
    fresh = tiny_model("llama")
    with pulled.transplanted(fresh) as transplant:  # the whole block, where it belongs
        assert transplant.mode == "splice" and transplant.layer_indices == [1, 2, 3, 4]


def test_a_reused_cache_trains_like_a_fresh_one(blocks):
    donor = tiny_model("llama")
    cache = PrefixCache.build(donor, 2, every_block(blocks))
    runs = []
    for prefix_cache in (None, cache, cache):  # built inside, then the same cache shared by two runs
        organ = not_hub.extract_organ(donor, layer_range=(2, 4))
        metrics = train_organ(
            organ, donor, blocks, method="in_situ", max_steps=3, lr=3e-3, batch_size=8, eval_every=3,
            progress=False, prefix_cache=prefix_cache,
        )  # fmt: skip
        runs.append((organ.state_dict(), metrics, organ.config.training["prefix_cache"]))
    assert runs[0][2]["misses"] > 0 and runs[1][2]["reused"] and runs[1][2]["misses"] == 0
    for state, metrics, _ in runs[1:]:
        assert [h["validation_loss"] for h in metrics.history] == [h["validation_loss"] for h in runs[0][1].history]
        for name, tensor in runs[0][0].items():
            assert torch.equal(state[name], tensor)


def test_a_cache_that_does_not_fit_is_refused_and_nothing_trains(blocks):
    donor = tiny_model("llama")
    before = {k: v.clone() for k, v in donor.state_dict().items()}
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    initial = {k: v.clone() for k, v in organ.state_dict().items()}
    other_slot = PrefixCache.build(donor, 3, every_block(blocks))
    other_model = PrefixCache.build(tiny_model("llama", seed=1), 2, every_block(blocks))
    stale = PrefixCache.build(donor, 2, every_block(blocks))
    kwargs = dict(method="in_situ", max_steps=2, lr=3e-3, batch_size=8, progress=False)
    for cache, words in [
        (other_slot, "input of layer 3, the organ starts at layer 2"),
        (other_model, "another model"),
        (stale, "frozen weights below the organ changed"),
    ]:
        if cache is stale:
            with torch.no_grad():
                donor.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # new values (the content hash sees it)
        with pytest.raises(InvalidArgumentError, match=words):
            train_organ(organ, donor, blocks, prefix_cache=cache, **kwargs)
        assert all(torch.equal(v, initial[k]) for k, v in organ.state_dict().items())
        if cache is not stale:
            assert all(torch.equal(v, before[k]) for k, v in donor.state_dict().items())
        assert len(donor.model.layers) == 6 and not getattr(donor.config, "transplants", None)
