"""Training precision chosen by the machine: bf16 autocast where the processor does bf16 natively, float32 elsewhere,
the launcher's setting first, the choice recorded; and bf16 training that learns what float32 training learns."""

import pytest
import torch
from tiny_models import tiny_model
from tiny_tokenizer import code_documents, tiny_tokenizer

import not_hub
from not_hub import precision
from not_hub.cards import render_card
from not_hub.data import make_blocks, split_documents
from not_hub.errors import InvalidArgumentError
from not_hub.training import train_organ, validation_loss


@pytest.fixture(scope="module")
def blocks():
    return make_blocks(split_documents(code_documents(), seed=0), tiny_tokenizer(), 32)


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a CPU with or without native bf16, with no launcher setting."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def set_flags(flags):
        precision.cpu_has_native_bf16.cache_clear()
        monkeypatch.setattr(precision, "cpu_flags", lambda: flags)

    yield set_flags
    precision.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),  # AMD Zen 4, Intel Cooper Lake and later
        ({"avx2", "amx_bf16"}, "bf16"),  # Intel Sapphire Rapids
        ({"fp", "asimd", "bf16"}, "bf16"),  # Arm with FEAT_BF16 (Graviton 3, Apple M2 under Linux)
        ({"avx2", "avx512f"}, "no"),  # AVX-512 without bf16: torch would emulate it, slower than float32
        ({"fp", "asimd"}, "no"),
    ],
)
def test_auto_picks_bf16_only_where_the_processor_has_it(machine, flags, expected):
    machine(flags)
    assert not_hub.resolve_mixed_precision("auto") == expected
    assert not_hub.resolve_mixed_precision(None) == expected  # None: the old spelling of the default


def test_the_launchers_setting_and_a_forced_choice_win(machine, monkeypatch):
    machine({"avx512_bf16"})
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch --mixed_precision no
    assert not_hub.resolve_mixed_precision("auto") == "no"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert not_hub.resolve_mixed_precision("no") == "no"
    machine(set())
    assert not_hub.resolve_mixed_precision("bf16") == "bf16"


def test_without_flags_to_read_a_measured_probe_decides(machine, monkeypatch):
    machine(None)
    monkeypatch.setattr(precision, "_probe_bf16_faster", lambda: False)
    assert not_hub.resolve_mixed_precision("auto") == "no"


def test_an_unknown_precision_is_refused_before_training(blocks):
    donor = tiny_model("llama")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    with pytest.raises(InvalidArgumentError, match="mixed_precision"):
        train_organ(organ, donor, blocks, max_steps=1, progress=False, mixed_precision="bfloat16")


def _train(blocks, **kwargs):
    donor = tiny_model("llama")
    organ = not_hub.extract_organ(donor, layer_range=(2, 4))
    metrics = train_organ(
        organ, donor, blocks, method="in_situ", max_steps=12, lr=3e-3, batch_size=8, eval_every=12, progress=False,
        **kwargs,
    )  # fmt: skip
    return organ, metrics


def test_bf16_autocast_learns_what_float32_learns_and_is_recorded(machine, blocks):
    machine({"avx512_bf16"})
    fp32, m32 = _train(blocks, mixed_precision="no")
    bf16, m16 = _train(blocks)  # "auto" on a bf16 machine
    assert m32.mixed_precision == "no" and m16.mixed_precision == "bf16"
    assert bf16.config.training["mixed_precision"] == "bf16"
    assert "| precision | bf16 autocast (float32 weights) |" in render_card(bf16.config)
    # The same 12 steps, same data order: the validation loss within 2% (bf16 rounds activations to 8 mantissa
    # bits; the master weights and optimizer stay float32, so the updates do not drift apart).
    initial = validation_loss(tiny_model("llama"), blocks.validation, 8)
    assert m16.history[-1]["validation_loss"] == pytest.approx(m32.history[-1]["validation_loss"], rel=0.02)
    assert m16.history[-1]["validation_loss"] < initial - 0.1  # and it did learn
    assert all(p.dtype == torch.float32 for p in bf16.parameters())  # float32 master weights, saved as such
