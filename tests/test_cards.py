"""Organ model cards: rendered from the template on every save, valid YAML, metadata round-trips."""

import yaml
from huggingface_hub import ModelCard
from tiny_models import tiny_model

import not_hub
from not_hub.cards import CARD_MARKER, render_card

EVALUATION = {
    "results": [
        {
            "dataset": "CodeXGLUE Java/C#",
            "dataset_type": "code_x_glue_cc_code_to_code_trans",
            "split": "test",
            "metric": "perplexity",
            "value": 3.25,
            "baseline": 3.9,
            "position": 4,
            "mode": "replace",
        },
    ],
    "best_position": 4,
}


def _organ(**kwargs):
    return not_hub.extract_organ(tiny_model("llama"), layer_range=(2, 4), base_model="org/donor", **kwargs)


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_untrained_organ_card(tmp_path):
    _organ().save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["library_name"] == "not_hub" and meta["base_model"] == "org/donor"
    assert {"not_hub", "organ", "llama"} <= set(meta["tags"]) and "pipeline_tag" not in meta  # cannot generate alone
    assert meta["base_model_relation"] == "adapter"  # listed among the donor's adapters, not its fine-tunes
    assert "model-index" not in meta
    assert CARD_MARKER in text and "layers [2, 4) of org/donor" in text
    assert "No evaluation recorded yet." in text and "not trained further" in text


def test_trained_organ_card_has_model_index_and_baseline(tmp_path):
    organ = _organ(license="apache-2.0")
    organ.config.training = {"method": "standalone", "epochs": 5, "lr": 1e-4, "datasets": ["shared/codexglue"]}
    organ.config.evaluation = EVALUATION
    organ.save_pretrained(tmp_path, repo_id="user/code-organ")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.license == "apache-2.0" and card.data.datasets == ["shared/codexglue"]
    (result,) = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_split) == ("perplexity", 3.25, "test")
    assert card.data.model_name == "user/code-organ"
    assert "| CodeXGLUE Java/C# | test | perplexity | 4 (replace) | 3.9 | 3.25 |" in card.text
    assert 'OrganModel.from_pretrained("user/code-organ")' in card.text
    # Round trip: the metadata survives ModelCard.load -> str -> load.
    again = ModelCard(str(card))
    assert again.data.to_dict() == card.data.to_dict()


def test_card_is_regenerated_on_every_save(tmp_path):
    organ = _organ()
    organ.save_pretrained(tmp_path)
    organ.config.evaluation = EVALUATION
    organ.save_pretrained(tmp_path)
    assert "3.25" in (tmp_path / "README.md").read_text()


def test_license_is_inherited_from_the_donor_card(tmp_path):
    donor = tiny_model("llama")
    donor.save_pretrained(tmp_path / "donor")
    (tmp_path / "donor" / "README.md").write_text("---\nlicense: mit\n---\n# donor\n")
    organ = not_hub.extract_organ(donor, layer_range=(1, 3), base_model=str(tmp_path / "donor"))
    assert organ.config.license == "mit"
    assert _front_matter(render_card(organ.config))["license"] == "mit"
    assert "base_model" not in _front_matter(render_card(organ.config))  # a local path is not a Hub id
