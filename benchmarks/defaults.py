"""Do the defaults work on a corpus nobody tuned for? `not-hub train ORGAN --data corpus.jsonl --max-seconds 120`.

    .venv/bin/python benchmarks/defaults.py            # ~12 min on 2 CPU cores (run it alone)
    .venv/bin/python benchmarks/defaults.py --seconds 20 --docs 300   # a quick look

The corpus is one no benchmark (and no default choice) ever used: top-level functions and classes of the Python
standard library of the interpreter running this script (one per document, 200-4,000 characters, a seeded choice of
`--docs`), written to a JSONL file. Steps, as a new user would run them:

1. `not-hub extract smollm2 --out organ` (the default organ: 3 layers from floor(30/3) = 10);
2. `not-hub train organ --donor smollm2 --data corpus.jsonl --max-seconds 120 --out trained`, nothing else (the
   donor named because the organ's `base_model`, the SmolLM2 Hub id, cannot be downloaded here);
3. `not-hub evaluate smollm2 --organ trained --data corpus.jsonl --split test` (the donor with and without it);
4. beside it, peft LoRA r=8 on every linear layer with not_hub's default LoRA rate, the same data, split and budget,
   trained by the same `fit_parameters`, scored on the same test documents.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, write_json, write_markdown  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "not_hub.cli"]


def build_corpus(path: Path, n_docs: int) -> dict:
    """Top-level definitions of the standard library (tests and site-packages excluded), one per document."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for file in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in file.parts):
            continue
        try:
            source = file.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                text = ast.get_source_segment(source, node)
                if text and 200 <= len(text) <= 4000:
                    docs.append(text)
    docs = sorted(set(docs), key=lambda d: hashlib.sha256(f"defaults|{d}".encode()).hexdigest())[:n_docs]
    with path.open("w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    return {
        "source": f"Python {sys.version.split()[0]} standard library ({stdlib}), top-level definitions",
        "documents": len(docs),
        "characters": sum(map(len, docs)),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def run(cmd: list[str]) -> str:
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    sys.stdout.write(out.stdout[-3000:])
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-5000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return out.stdout


def lora_baseline(corpus: Path, seconds: float, test_docs: int) -> dict:
    """peft LoRA r=8 on every linear layer, not_hub's default LoRA rate, the CLI's split and budget."""
    import torch
    from common import load_smollm2
    from peft import LoraConfig, get_peft_model

    from not_hub.data import load_documents, make_blocks, split_documents
    from not_hub.evaluation import perplexity
    from not_hub.training import DEFAULT_LR, OrganTrainingArguments, fit_parameters

    torch.manual_seed(0)
    model, tok = load_smollm2()
    splits = split_documents(load_documents(corpus), validation=0.1, test=0.1, seed=0)
    blocks = make_blocks(splits, tok, 256, seed=0, max_validation_blocks=64)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    net = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    params = [p for p in net.parameters() if p.requires_grad]
    args = OrganTrainingArguments(lr=DEFAULT_LR["lora"], max_seconds=seconds, progress=False)
    metrics = fit_parameters(net, params, blocks, args, "lora_r8_all")
    test = sorted(splits.test, key=lambda d: hashlib.sha256(f"eval|{d}".encode()).hexdigest())[:test_docs]
    return {
        "lr": DEFAULT_LR["lora"],
        "steps": metrics.steps,
        "tokens_seen": metrics.tokens_seen,
        "test_perplexity": perplexity(net, test, tokenizer=tok).perplexity,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--test-docs", type=int, default=100)
    p.add_argument("--name", default="defaults")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="not_hub-defaults-") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        about = build_corpus(corpus, args.docs)
        print(json.dumps(about), flush=True)
        run([*CLI, "extract", "smollm2", "--out", str(tmp / "organ")])
        t0 = time.perf_counter()
        train_out = run(
            [*CLI, "train", str(tmp / "organ"), "--donor", "smollm2", "--data", str(corpus), "--max-seconds",
             str(args.seconds), "--out", str(tmp / "trained")]
        )  # fmt: skip
        train_s = time.perf_counter() - t0
        run(
            [*CLI, "evaluate", "smollm2", "--organ", str(tmp / "trained"), "--data", str(corpus), "--split", "test",
             "--max-eval-docs", str(args.test_docs), "--out", str(tmp / "eval.json")]
        )  # fmt: skip
        evaluation = json.loads((tmp / "eval.json").read_text())
        training = json.loads((tmp / "trained" / "config.json").read_text())["training"]
        lora = lora_baseline(corpus, args.seconds, args.test_docs)
    untouched = evaluation["perplexity"]
    organ = evaluation["transplanted"]["perplexity"]
    result = {
        "machine": machine(),
        "corpus": about,
        "budget_s": args.seconds,
        "command": "not-hub train ORGAN --donor smollm2 --data corpus.jsonl --max-seconds "
        f"{args.seconds:g} --out trained (nothing else)",
        "train_stdout": train_out.strip().splitlines()[-3:],
        "train_command_s": round(train_s, 1),
        "organ": {
            "method": training["method"],
            "lr": training["lr"],
            "steps": training["steps"],
            "tokens_seen": training["tokens_seen"],
            "first_step_s": training.get("first_step_s"),
            "wall_clock_s": training["wall_clock_s"],
            "validation_s": training["validation_s"],
            "test_perplexity": organ,
        },
        "untouched_test_perplexity": untouched,
        "test_documents": evaluation["documents"],
        "lora_r8_all": lora,
        "organ_over_untouched": organ / untouched,
        "organ_over_lora": organ / lora["test_perplexity"],
    }
    write_json(args.name, result)
    md = [
        f"# Defaults on an unseen corpus ({about['documents']} documents, {about['source']})",
        "",
        f"`{result['command']}`; test perplexity on {evaluation['documents']} held-out documents.",
        "",
        "| model | steps | tokens seen | test perplexity | / untouched |",
        "|---|---|---|---|---|",
        f"| untouched SmolLM2-135M | - | - | {untouched:.3f} | 1.000 |",
        f"| organ, defaults ({training['method']}, lr {training['lr']:g}) | {training['steps']} | "
        f"{training['tokens_seen']:,} | {organ:.3f} | {organ / untouched:.3f} |",
        f"| peft LoRA r=8, all linear (lr {lora['lr']:g}) | {lora['steps']} | {lora['tokens_seen']:,} | "
        f"{lora['test_perplexity']:.3f} | {lora['test_perplexity'] / untouched:.3f} |",
        "",
        f"Organ / LoRA: {organ / lora['test_perplexity']:.3f}. First optimizer step after "
        f"{training.get('first_step_s')} s of the budget; the whole `not-hub train` call took {train_s:.0f} s "
        f"(model load, tokenising, validation included) for a {args.seconds:g} s budget.",
    ]
    write_markdown(args.name, "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {RESULTS / (args.name + '.json')}")


if __name__ == "__main__":
    main()
