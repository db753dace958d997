"""In-situ training with the frozen prefix computed once: same losses and weights as the uncached run."""

import pytest
import torch
from tiny_models import tiny_model
from tiny_tokenizer import code_documents, tiny_tokenizer

import not_hub
from not_hub.data import make_blocks, split_documents
from not_hub.errors import InvalidArgumentError
from not_hub.prefix_cache import CachedPrefixModel, PrefixCache, blocks_to_cache
from not_hub.training import train_organ


@pytest.fixture(scope="module")
def blocks():
    return make_blocks(split_documents(code_documents(), seed=0), tiny_tokenizer(), 32)


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
        torch.testing.assert_close(CachedPrefixModel(donor, cache)(input_ids=ids).logits, donor(ids).logits)


def test_a_cache_over_the_memory_limit_is_a_mapped_file_with_the_same_result(blocks, tmp_path, hash_state):
    donor = tiny_model("llama")
    before = hash_state(donor)
    ids = blocks.validation[:4]["input_ids"]
    in_memory = PrefixCache.build(donor, 3, [ids])
    mapped = PrefixCache.build(donor, 3, [ids], memory_limit=0, cache_dir=tmp_path)
    assert in_memory.path is None and mapped.path is not None and mapped.path.parent == tmp_path
    assert torch.equal(in_memory.lookup(ids[[2, 0]]), mapped.lookup(ids[[2, 0]]))
    organ, metrics = _train("llama", (2, 4), blocks, cache_memory_limit=0, output_dir=str(tmp_path / "run"))
    assert organ.config.training["prefix_cache"]["storage"] == "memory-mapped safetensors"
    assert (tmp_path / "run" / "prefix_cache" / "prefix-2.safetensors").is_file()
    reference, _ = _train("llama", (2, 4), blocks)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(organ.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)
    assert hash_state(donor) == before


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
    cache = PrefixCache.build(donor, 2, blocks_to_cache(blocks))
    runs = []
    for prefix_cache in (None, cache, cache):  # built inside, then the same cache shared by two runs
        organ = not_hub.extract_organ(donor, layer_range=(2, 4))
        metrics = train_organ(
            organ, donor, blocks, method="in_situ", max_steps=3, lr=3e-3, batch_size=8, eval_every=3,
            progress=False, prefix_cache=prefix_cache,
        )  # fmt: skip
        runs.append((organ.state_dict(), metrics, organ.config.training["prefix_cache"]))
    assert runs[0][2]["build_s"] > 0 and runs[1][2]["reused"] and runs[1][2]["build_s"] == 0.0
    for state, metrics, _ in runs[1:]:
        assert [h["validation_loss"] for h in metrics.history] == [h["validation_loss"] for h in runs[0][1].history]
        for name, tensor in runs[0][0].items():
            assert torch.equal(state[name], tensor)


def test_a_cache_that_does_not_fit_is_refused_and_nothing_trains(blocks):
    donor = tiny_model("llama")
    before = {k: v.clone() for k, v in donor.state_dict().items()}
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    initial = {k: v.clone() for k, v in organ.state_dict().items()}
    other_slot = PrefixCache.build(donor, 3, blocks_to_cache(blocks))
    few_blocks = PrefixCache.build(donor, 2, [blocks.train[:2]["input_ids"]])
    other_model = PrefixCache.build(tiny_model("llama", seed=1), 2, blocks_to_cache(blocks))
    stale = PrefixCache.build(donor, 2, blocks_to_cache(blocks))
    kwargs = dict(method="in_situ", max_steps=2, lr=3e-3, batch_size=8, progress=False)
    for cache, words in [
        (other_slot, "input of layer 3, the organ starts at layer 2"),
        (few_blocks, "blocks were not seen"),
        (other_model, "another model"),
        (stale, "frozen weights below the organ changed"),
    ]:
        if cache is stale:
            with torch.no_grad():
                donor.model.layers[0].mlp.up_proj.weight.mul_(1.0)  # same values, a new in-place version
        with pytest.raises(InvalidArgumentError, match=words):
            train_organ(organ, donor, blocks, prefix_cache=cache, **kwargs)
        assert all(torch.equal(v, initial[k]) for k, v in organ.state_dict().items())
        assert all(torch.equal(v, before[k]) for k, v in donor.state_dict().items())
        assert len(donor.model.layers) == 6 and not getattr(donor.config, "transplants", None)
