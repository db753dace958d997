"""The CLI pipeline end to end on a tiny model saved to disk: extract, train, sweep, recover, evaluate, inspect."""

import json

import pytest
from tiny_models import tiny_model
from tiny_tokenizer import code_documents, tiny_tokenizer
from transformers import AutoModelForCausalLM

import not_hub
from not_hub.cli import main


@pytest.fixture
def workspace(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    docs = code_documents(300)
    (tmp_path / "train.txt").write_text("\n".join(docs[:240]))
    (tmp_path / "valid.txt").write_text("\n".join(docs[240:270]))
    (tmp_path / "test.txt").write_text("\n".join(docs[270:]))
    return tmp_path


def test_cli_pipeline(workspace, capsys):
    w = workspace
    data = [
        "--data",
        str(w / "train.txt"),
        "--validation-data",
        str(w / "valid.txt"),
        "--test-data",
        str(w / "test.txt"),
        "--unit",
        "line",
        "--block-size",
        "32",
    ]
    assert main(["extract", str(w / "model"), "--layer-range", "2", "4", "--out", str(w / "organ")]) == 0
    assert (
        main(
            [
                "train",
                str(w / "organ"),
                "--donor",
                str(w / "model"),
                "--out",
                str(w / "trained"),
                "--epochs",
                "1",
                "--lr",
                "3e-3",
                "--run-dir",
                str(w / "run"),
                *data,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "validation perplexity (30 documents): donor " in out and "donor with the organ" in out
    trained = not_hub.OrganModel.from_pretrained(w / "trained")
    assert trained.config.training["method"] == "in_situ"  # the default (benchmarks/gain.py)
    assert trained.config.training["data"]["documents"] == {"train": 240, "validation": 30, "test": 30}

    assert (
        main(
            [
                "sweep",
                str(w / "trained"),
                "--recipient",
                str(w / "model"),
                "--out",
                str(w / "sweep.json"),
                "--plot",
                str(w / "sweep.png"),
                "--max-length",
                "64",
                *data,
            ]
        )
        == 0
    )
    sweep = json.loads((w / "sweep.json").read_text())
    assert sweep["split"] == "validation" and [r["position"] for r in sweep["rows"]] == list(range(5))
    assert (w / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    best = sweep["summary"]["replace"]["best_position"]

    assert (
        main(
            [
                "recover",
                str(w / "trained"),
                "--recipient",
                str(w / "model"),
                "--position",
                str(best),
                "--epochs",
                "1",
                "--lr",
                "3e-3",
                "--save-to",
                str(w / "recovered"),
                "--organ-out",
                str(w / "recovered-organ"),
                *data,
            ]
        )
        == 0
    )
    assert AutoModelForCausalLM.from_pretrained(w / "recovered").config.transplants[0]["recovery"]["radius"] == 1

    assert (
        main(
            [
                "evaluate",
                str(w / "model"),
                "--organ",
                str(w / "trained"),
                "--position",
                str(best),
                "--split",
                "test",
                "--record",
                "--dataset-name",
                "toy-code",
                "--out",
                str(w / "eval.json"),
                "--max-length",
                "64",
                *data,
            ]
        )
        == 0
    )
    result = json.loads((w / "eval.json").read_text())
    assert result["split"] == "test" and result["transplanted"]["position"] == best
    recorded = not_hub.OrganModel.from_pretrained(w / "trained").config.evaluation["results"][0]
    assert recorded["dataset"] == "toy-code" and recorded["baseline"] == pytest.approx(result["perplexity"], rel=1e-3)
    assert "toy-code" in (w / "trained" / "README.md").read_text()

    capsys.readouterr()
    assert main(["inspect", str(w / "trained"), "--recipient", str(w / "model")]) == 0
    out = capsys.readouterr().out
    assert '"method": "in_situ"' in out and "=> compatible" in out


def test_cli_reports_errors_without_a_traceback(workspace, capsys):
    assert main(["inspect", str(workspace / "nowhere")]) == 1
    assert "error:" in capsys.readouterr().err
    main(["extract", str(workspace / "model"), "--layer-range", "2", "4", "--out", str(workspace / "organ")])
    assert (
        main(
            [
                "transplant",
                "--organ",
                str(workspace / "organ"),
                "--recipient",
                str(workspace / "model"),
                "--position",
                "9",
            ]
        )
        == 1
    )
    assert "expected 0 <= position <= 4" in capsys.readouterr().err


def test_cli_train_says_where_its_wall_time_went_and_can_skip_the_final_scoring(workspace, capsys):
    w = workspace
    assert main(["extract", str(w / "model"), "--layer-range", "2", "4", "--out", str(w / "organ")]) == 0
    argv = ["train", str(w / "organ"), "--donor", str(w / "model"), "--out", str(w / "trained"), "--max-steps", "1"]
    argv += ["--data", str(w / "train.txt"), "--unit", "line", "--block-size", "32", "--eval-docs", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "validation perplexity" not in out  # the optional part, skipped
    line = next(line for line in out.splitlines() if line.startswith("wall time"))
    for part in ("loading", "data", "training", "first step after", "saving and scoring"):
        assert part in line, line
