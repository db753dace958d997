"""A grafted model exported to GGUF by llama.cpp's own converter, read back by transformers' GGUF loader: the
grafted model's logits within the file type's tolerance, the layers and the tokenizer carried over."""

import pytest
import torch
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import not_hub
from not_hub.cli import main
from not_hub.errors import InvalidArgumentError, TransplantStateError
from not_hub.gguf_export import converter_path, fetch_converter
from not_hub.loading import embedded_gguf_path

# SmolLM2's tokenizer (llama.cpp recognises it), on a tiny llama with its vocabulary: the converter runs in seconds.
SHAPE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def converter():
    return converter_path() or fetch_converter()  # scripts/setup.sh fetches it once


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    gguf = embedded_gguf_path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


def _grafted():
    model = tiny_model("llama", **SHAPE)
    organ = not_hub.extract_organ(tiny_model("llama", seed=3, **SHAPE), layer_range=(1, 3))
    organ.transplant_into(model, position=4, mode="insert")  # 6 + 2 layers: a new depth for llama.cpp to read
    return model


def _ids(tokenizer):
    return tokenizer(["int add(int a, int b) { return a + b; }", "The party shall pay"], return_tensors="pt",
                     padding=True).input_ids  # fmt: skip


@pytest.mark.parametrize("outtype, tolerance", [("f32", 1e-4), ("f16", 2e-2), ("q8_0", 0.25)])
def test_an_exported_grafted_model_reads_back_with_its_logits(converter, tokenizer_dir, tmp_path, outtype, tolerance):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = tokenizer.eos_token
    model = _grafted()
    path = not_hub.export_gguf(model, tokenizer, tmp_path / f"grafted-{outtype}.gguf", outtype=outtype)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert loaded.config.num_hidden_layers == 8
    ids = _ids(tokenizer)[:1]
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    assert (got - expected).abs().max() / expected.abs().max() < tolerance
    if outtype == "f16":  # the tokenizer and its chat template travel in the file
        back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
        assert back("int add(int a)").input_ids == tokenizer("int add(int a)").input_ids
        assert back.chat_template == tokenizer.chat_template
        from gguf import GGUFReader

        fields = GGUFReader(path).fields
        description = bytes(fields["general.description"].parts[-1]).decode()
        assert "1 organ(s) grafted by not_hub" in description and "insert at layer 4" in description


def test_bridges_and_bad_arguments_are_refused_and_nothing_is_written(converter, tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_model("llama", **SHAPE)
    organ = not_hub.extract_organ(tiny_model("llama", seed=3, **SHAPE), layer_range=(1, 3))
    organ.transplant_into(model, position=4, mode="bridge")
    with pytest.raises(TransplantStateError, match="bridges"):
        not_hub.export_gguf(model, tokenizer, tmp_path / "bridged.gguf")
    with pytest.raises(InvalidArgumentError, match="outtype"):
        not_hub.export_gguf(model, tokenizer, tmp_path / "x.gguf", outtype="q4_k")
    assert not list(tmp_path.glob("*.gguf"))


def test_cli_export_grafts_then_writes_the_gguf(converter, tokenizer_dir, tmp_path):
    tiny_model("llama", **SHAPE).save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "model")
    grown = not_hub.grow_organ(tiny_model("llama", **SHAPE), 3, num_layers=2)
    grown.save_pretrained(tmp_path / "organ")
    argv = ["export", str(tmp_path / "model"), "--organ", str(tmp_path / "organ"), "--out", str(tmp_path / "m.gguf")]
    assert main([*argv, "--outtype", "f32"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    assert loaded.config.num_hidden_layers == 8
