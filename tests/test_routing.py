"""Organs trained apart, grafted into one model and routed by their signatures: each on for its own kind of text,
skipped exactly elsewhere, the base model recovered bit for bit, published and pulled back as one."""

import pytest
import torch
from test_hub import local_hub, run_scenario  # noqa: F401  (the local Hub server fixture)
from tiny_models import tiny_model
from tiny_tokenizer import code_documents, tiny_tokenizer

import not_hub
from not_hub.data import make_blocks, pack_blocks, split_documents
from not_hub.errors import CheckpointFormatError, InvalidArgumentError
from not_hub.training import train_organ


def prose_documents(n: int = 240) -> list[str]:
    """A second 'domain', unlike code: upper-case contract-like sentences."""
    return [f"THE PARTY {i % 13} SHALL PAY {i * 7} DOLLARS ON DAY {i % 28} OF EACH MONTH." for i in range(n)]


def _specialist(docs, position, seed):
    base = tiny_model("llama")
    organ = not_hub.grow_organ(base, position, num_layers=1)
    blocks = make_blocks(split_documents(docs, seed=0), tiny_tokenizer(), 32)
    train_organ(organ, base, blocks, method="in_situ", max_steps=8, lr=1e-2, batch_size=8, eval_every=4,
                progress=False, seed=seed)  # fmt: skip
    organ.name_or_path = f"team/{'code' if docs[0].startswith('int') else 'prose'}-organ"
    return organ


@pytest.fixture(scope="module")
def specialists():
    return _specialist(code_documents(), 2, 0), _specialist(prose_documents(), 4, 1)


def _ids(docs, n=8):
    return torch.as_tensor(pack_blocks(docs[-40:], tiny_tokenizer(), 32)["input_ids"][:n])


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_in_situ_training_records_a_signature_saved_with_the_weights(specialists, tmp_path):
    code, _ = specialists
    signature = code.routing_signature
    assert signature is not None and signature.tokens > 0 and signature.directions.shape == (4, 32)
    assert torch.isfinite(torch.tensor(signature.threshold))
    code.save_pretrained(tmp_path / "code")
    assert {"routing.mean", "routing.directions", "routing.variances"} <= set(code.config.tensor_sha256)
    loaded = not_hub.OrganModel.from_pretrained(tmp_path / "code")
    assert loaded.config.routing_signature == code.config.routing_signature
    for name in ("mean", "directions", "variances"):
        assert torch.equal(getattr(loaded.routing_signature, name), getattr(signature, name))
    # The training tokens' own distances average about 1 (each term is normalised by its variance).
    ids = _ids(code_documents())
    base = tiny_model("llama")
    with loaded.transplanted(base) as t:
        seen = []
        handle = t.layers[0].register_forward_pre_hook(lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]),
                                                       with_kwargs=True)  # fmt: skip
        _logits(base, ids)
        handle.remove()
    assert 0.3 < float(signature.distance(seen[0][:, 1:]).mean()) < 3


def test_a_router_that_selects_nothing_is_the_base_model_bit_for_bit(specialists, hash_state):
    model = tiny_model("llama")
    before = hash_state(model)
    ids = torch.cat([_ids(code_documents(), 4), _ids(prose_documents(), 4)])
    expected = _logits(model, ids)
    transplants = not_hub.OrganSet.routed(list(specialists)).transplant_into(model)
    router = not_hub.router_of(model)
    for name in router.states:
        router.set_threshold(name, float("-inf"))
    assert torch.equal(_logits(model, ids), expected)
    assert all(not g.any() for g in router.decisions.values())
    for t in reversed(transplants):
        t.explant()
    assert hash_state(model) == before and not_hub.router_of(model) is None


def test_each_organ_is_chosen_for_its_own_text_from_the_tokens_before(specialists):
    model = tiny_model("llama")
    not_hub.OrganSet.routed(list(specialists)).transplant_into(model)
    router = not_hub.router_of(model)
    share = {}
    for domain, docs in (("code", code_documents()), ("prose", prose_documents())):
        router.reset_counts()
        _logits(model, _ids(docs))
        share[domain] = router.share_on()
    code, prose = "team/code-organ", "team/prose-organ"
    assert share["code"][code] > 0.5 and share["code"][prose] < 0.05, share
    assert share["prose"][prose] > 0.5 and share["prose"][code] < 0.05, share
    # Causal: the gates of the first 20 tokens do not depend on the tokens after them.
    ids = _ids(code_documents(), 2)
    _logits(model, ids)
    full = {k: v.clone() for k, v in router.decisions.items()}
    _logits(model, ids[:, :20])
    assert all(torch.equal(router.decisions[k], full[k][:, :20]) for k in full)
    # Gated off, a token's hidden state passes the organ unchanged; the first tokens wait for evidence.
    assert not any(g[:, : router.states[code].signature.min_tokens].any() for g in full.values())


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_routed_generation_with_the_kv_cache_equals_without(specialists, mode):
    model = tiny_model("llama")
    transplants = not_hub.OrganSet.routed(list(specialists), mode=mode).transplant_into(model)
    prompt = _ids(code_documents(), 2)[:, :16]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        plain = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, plain)
    assert any(g.any() for g in not_hub.router_of(model).decisions.values())
    for t in reversed(transplants):
        t.explant()


def test_routing_refuses_what_it_cannot_skip_exactly_or_has_no_signature(specialists, tmp_path):
    code, prose = specialists
    model = tiny_model("llama")
    replacing = not_hub.extract_organ(model, layer_range=(1, 2))
    transplant = replacing.transplant_into(model)
    with pytest.raises(InvalidArgumentError, match="only inserted organs"):
        not_hub.route(model)
    transplant.explant()
    bare = not_hub.OrganModel.from_pretrained(_saved(code, tmp_path))
    bare.set_routing_signature(None)  # as an organ published before signatures existed
    t = bare.transplant_into(model)
    with pytest.raises(InvalidArgumentError, match="compute_routing_signature"):
        not_hub.route(model)
    t.explant()
    signature = not_hub.compute_routing_signature(bare, model, code_documents()[:60], tokenizer=tiny_tokenizer())
    assert signature.tokens > 0 and bare.routing_signature is not None
    bare.transplant_into(model)
    router = not_hub.route(model)
    _logits(model, _ids(code_documents()))
    assert next(iter(router.share_on().values())) > 0.5


def _saved(organ, tmp_path):
    organ.save_pretrained(tmp_path / "saved")
    return tmp_path / "saved"


def test_a_manifest_with_an_unknown_routing_mode_is_refused(specialists, tmp_path):
    import json

    not_hub.OrganSet.routed(list(specialists)).save_pretrained(tmp_path / "set")
    path = tmp_path / "set" / "organ_set.json"
    manifest = json.loads(path.read_text())
    assert manifest["routing"] == {"mode": "token"}
    assert "team/code-organ" in (tmp_path / "set" / "README.md").read_text()
    manifest["routing"] = {"mode": "eval('x')"}
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointFormatError, match="routing"):
        not_hub.OrganSet.from_pretrained(tmp_path / "set")


def test_a_routed_set_pushes_as_one_repo_and_pulls_back_to_the_same_logits(specialists, local_hub, tmp_path):  # noqa: F811
    model = tiny_model("llama")
    routed = not_hub.OrganSet.routed(list(specialists))
    routed.transplant_into(model)
    ids = torch.cat([_ids(code_documents(), 2), _ids(prose_documents(), 2)])
    torch.save({"ids": ids, "logits": _logits(model, ids)}, tmp_path / "expected.pt")
    routed.save_pretrained(tmp_path / "set")
    run_scenario(
        local_hub,
        tmp_path,
        f"""
        not_hub.OrganSet.from_pretrained({str(tmp_path / "set")!r}).push_to_hub("team/routed-set")
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = tiny_model("llama")
        transplants = not_hub.OrganSet.from_pretrained("team/routed-set").transplant_into(model)
        router = not_hub.router_of(model)
        assert router is not None and len(router.states) == 2
        with torch.no_grad():
            assert torch.equal(model(expected["ids"]).logits, expected["logits"])
        """,
    )
