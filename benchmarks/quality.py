"""Quality: the NOT paper's research questions on SmolLM2-135M, with an honest protocol.

    .venv/bin/python benchmarks/quality.py --quick     # one domain, one seed, small budgets (~10 min)
    .venv/bin/python benchmarks/quality.py --full      # four domains x three seeds (see PRESETS)

Protocol: documents split by document; every trained method sees the same training blocks (seeded order); the
organ's position is chosen on validation and every figure is reported on test, beside the untouched model's. All
methods are trained by the same loop (`not_hub.training.fit_parameters`): NOT standalone organ (the paper), NOT with
recovery, in-situ organ, peft LoRA (r=8, alpha=16, q/k/v/o) and full fine-tuning, (a) for the same number of
epochs and (b) for the same wall-clock budget. Results are written after every domain and seed, so an interrupted
run keeps what it finished.
"""

from __future__ import annotations

import copy
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, Timer, load_smollm2, machine, preset_parser, write_json, write_markdown  # noqa: E402
from domains import DOMAINS  # noqa: E402

import not_hub  # noqa: E402
from not_hub.data import BlockData, make_blocks  # noqa: E402
from not_hub.evaluation import perplexity, position_sweep  # noqa: E402
from not_hub.plots import sweep_figure  # noqa: E402
from not_hub.training import OrganTrainingArguments, fit_parameters, recover, train_bridges, train_organ  # noqa: E402

PRESETS = {
    "quick": dict(
        domains=["code"],
        seeds=[0],
        train_blocks=16,
        block=256,
        val_docs=12,
        test_docs=24,
        eval_chars=1500,
        epochs=1,
        recovery_epochs=1,
        budget_s=20,
        positions=[6, 10, 14],
        lr={"organ": 3e-4, "lora": 1e-3, "full": 1e-4},
    ),
}
# Sized for ~75 min on 2 CPU cores (12 domain-seed runs of ~6 min): small budgets, same protocol as quick.
PRESETS["full"] = {
    **PRESETS["quick"],
    "domains": ["code", "legal", "biomedical", "general"],
    "seeds": [0, 1, 2],
    "budget_s": 15,
    "positions": [4, 8, 10, 14],
}
ORGAN = (10, 13)
# The trained methods of the main table, and which of the preset's learning rates each one uses.
RATE_KEY = {
    "not_standalone": "organ",
    "not_recovered": "organ",
    "organ_in_situ": "organ",
    "lora_r8": "lora",
    "full_finetune": "full",
}
METHODS = tuple(RATE_KEY)


def held_out(docs: list[str], n: int, chars: int) -> list[str]:
    """A fixed, order-independent subset of held-out documents, each cut to its first `chars` characters."""
    chosen = sorted(docs, key=lambda d: hashlib.sha256(d.encode()).hexdigest())[:n]
    return [d[:chars] for d in chosen]


def ppl(model, docs, tok) -> float:
    return perplexity(model, docs, tokenizer=tok, max_length=512).perplexity


def train_args(preset: dict, seed: int, lr: float, *, budget: bool, epochs: float | None = None) -> dict:
    """Epochs regime: `epochs` passes, 10% warmup then linear decay. Budget regime: as many steps as fit in
    `budget_s` seconds, with the schedule laid out over 50 epochs (so the lr is near-constant within the budget)."""
    if budget:
        return dict(
            epochs=50, lr=lr, warmup_ratio=0.0, batch_size=4, seed=seed, progress=False, max_seconds=preset["budget_s"],
            trainer_args={"lr_scheduler_type": "constant"},  # the recorded protocol: a near-constant rate
        )  # fmt: skip
    return dict(
        epochs=epochs or preset["epochs"],
        lr=lr,
        warmup_ratio=0.1,
        batch_size=4,
        seed=seed,
        progress=False,
        max_seconds=preset["budget_s"] if budget else None,
    )


def baseline_model(kind: str, recipient, blocks: BlockData, args: OrganTrainingArguments):
    """A copy of the recipient with peft LoRA (r=8, alpha=16, q/k/v/o) or every weight trained by the same loop."""
    model = copy.deepcopy(recipient)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        )
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = list(model.parameters())
    metrics = fit_parameters(model, params, blocks, args, kind)
    return model.eval(), metrics


def run_baseline(kind: str, recipient, blocks: BlockData, test, tok, preset, seed, budget: bool) -> dict:
    """peft LoRA or full fine-tuning on a copy of the recipient, trained by the same loop as the organs."""
    args = OrganTrainingArguments(**train_args(preset, seed, preset["lr"][kind], budget=budget))
    model, metrics = baseline_model(kind, recipient, blocks, args)
    return {"test_ppl": ppl(model, test, tok), "train_s": metrics.wall_clock_s, "steps": metrics.steps}


def prepare(domain: str, seed: int, preset: dict, tok) -> tuple[BlockData, list[str], list[str]]:
    """One domain's training blocks (the first `train_blocks`, seeded order), validation and test documents."""
    splits = DOMAINS[domain]()
    blocks = make_blocks(splits, tok, preset["block"], seed=seed)
    train = blocks.train.select(range(min(preset["train_blocks"], len(blocks.train))))
    val_docs = held_out(splits.validation, preset["val_docs"], preset["eval_chars"])
    test = held_out(splits.test, preset["test_docs"], preset["eval_chars"])
    val_blocks = blocks.validation  # the best-weights selection uses 8 held-out validation blocks
    data = BlockData(
        train=train,
        validation=val_blocks.select(range(min(8, len(val_blocks)))),
        description={"domain": domain, "train_blocks": len(train), "block_size": preset["block"]},
    )
    return data, val_docs, test


def run_domain(domain: str, seed: int, preset: dict, recipient, tok) -> dict:
    data, val_docs, test = prepare(domain, seed, preset, tok)
    out = {
        "domain": domain,
        "seed": seed,
        "train_tokens": len(data.train) * preset["block"],
        "untouched": {"test_ppl": ppl(recipient, test, tok), "val_ppl": ppl(recipient, val_docs, tok)},
    }
    lr = preset["lr"]["organ"]
    for regime in ("epochs", "budget"):
        budget = regime == "budget"
        res = {}
        # NOT standalone organ: train, choose the position on validation, report on test, then recover.
        organ = not_hub.extract_organ(recipient, layer_range=ORGAN)
        with Timer() as t:
            m = train_organ(organ, recipient, data, method="standalone", **train_args(preset, seed, lr, budget=budget))
        rows = position_sweep(
            organ, recipient, val_docs, tokenizer=tok, positions=preset["positions"], max_length=512, progress=False
        ).rows
        sweep = {r["position"]: r["perplexity"] for r in rows}
        best = min(sweep, key=sweep.get)
        with organ.transplanted(recipient, position=best) as transplant:
            res["not_standalone"] = {
                "test_ppl": ppl(recipient, test, tok),
                "train_s": t.seconds,
                "position": best,
                "steps": m.steps,
            }
            with Timer() as t_rec:
                recover(
                    recipient,
                    transplant,
                    data,
                    radius=1,
                    **train_args(preset, seed, lr, budget=budget, epochs=preset["recovery_epochs"]),
                )
            res["not_recovered"] = {
                "test_ppl": ppl(recipient, test, tok),
                "train_s": t.seconds + t_rec.seconds,
                "position": best,
            }
        if regime == "epochs":
            out["position_sweep_validation"] = sweep
            # Direct replacement vs bridge-mediated insertion at the chosen position.
            with organ.transplanted(recipient, position=best, mode="bridge") as bridged:
                untrained_bridge = ppl(recipient, test, tok)
                train_bridges(recipient, bridged, data, **train_args(preset, seed, 1e-3, budget=False))
                out["bridge"] = {
                    "position": best,
                    "test_ppl_untrained_bridges": untrained_bridge,
                    "test_ppl_trained_bridges": ppl(recipient, test, tok),
                }
        # In-situ organ: trained at its own slot inside the frozen model, evaluated there.
        insitu = not_hub.extract_organ(recipient, layer_range=ORGAN)
        with Timer() as t:
            train_organ(insitu, recipient, data, method="in_situ", **train_args(preset, seed, lr, budget=budget))
        with insitu.transplanted(recipient, position=ORGAN[0]):
            res["organ_in_situ"] = {"test_ppl": ppl(recipient, test, tok), "train_s": t.seconds}
        res["lora_r8"] = run_baseline("lora", recipient, data, test, tok, preset, seed, budget)
        res["full_finetune"] = run_baseline("full", recipient, data, test, tok, preset, seed, budget)
        out[regime] = res
        print(
            f"  {domain} seed {seed} {regime}: "
            + ", ".join(f"{k} {v['test_ppl']:.2f}" for k, v in res.items())
            + f" (untouched {out['untouched']['test_ppl']:.2f})",
            flush=True,
        )
    return out


def integrity_check(recipient, tok, test) -> dict:
    """Organ saved, pushed to the local Hub server, pulled in a fresh process: same perplexity to 1e-6 relative."""
    import os
    import subprocess
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
    from hub_server import LocalHub

    organ = not_hub.extract_organ(recipient, layer_range=ORGAN)
    torch.manual_seed(0)
    with torch.no_grad():  # a changed organ, so the check is not trivially the untouched model
        for p in organ.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    with organ.transplanted(recipient, position=6):
        here = ppl(recipient, test, tok)
    hub = LocalHub().start()
    tmp = tempfile.mkdtemp()
    script = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import not_hub
from common import load_smollm2
from not_hub.evaluation import perplexity
action, path = sys.argv[1], sys.argv[2]
if action == "push":
    not_hub.OrganModel.from_pretrained(path).push_to_hub("bench/integrity")
else:  # a fresh process: pull by repo id into a fresh recipient
    model, tok = load_smollm2()
    not_hub.OrganModel.from_pretrained("bench/integrity").transplant_into(model, position=6)
    print(json.dumps(perplexity(model, json.load(open(path)), tokenizer=tok, max_length=512).perplexity))
"""
    organ.save_pretrained(Path(tmp) / "organ")
    (Path(tmp) / "test.json").write_text(json.dumps(test))
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(Path(tmp) / "hf"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": "x",
    }
    subprocess.run(
        [sys.executable, "-c", script, "push", str(Path(tmp) / "organ")], env=env, check=True, capture_output=True
    )
    out = subprocess.run(
        [sys.executable, "-c", script, "eval", str(Path(tmp) / "test.json")],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    hub.stop()
    there = float(out.stdout.strip().splitlines()[-1])
    return {
        "perplexity_here": here,
        "perplexity_after_hub_round_trip": there,
        "relative_difference": abs(there - here) / here,
    }


def summarise(results: list[dict]) -> dict:
    table = {}
    for regime in ("epochs", "budget"):
        for domain in sorted({r["domain"] for r in results}):
            rows = [r for r in results if r["domain"] == domain and regime in r]
            if not rows:
                continue
            methods = {"untouched": [r["untouched"]["test_ppl"] for r in rows]}
            for m in rows[0][regime]:
                methods[m] = [r[regime][m]["test_ppl"] for r in rows]
            table.setdefault(regime, {})[domain] = {
                m: {"mean": statistics.fmean(v), "std": statistics.pstdev(v) if len(v) > 1 else 0.0, "n": len(v)}
                for m, v in methods.items()
            }
    return table


def report(payload: dict) -> str:
    p = payload["settings"]
    lines = [
        f"### Quality ({payload['preset']} preset)",
        "",
        f"Training: {p['train_blocks']} blocks x {p['block']} tokens per domain and seed, batch 4; organ layers "
        f"{list(ORGAN)}; epochs regime: {p['epochs']} epoch(s) (recovery {p['recovery_epochs']}); budget "
        f"regime: {p['budget_s']} s of training per method (NOT+recovery: {p['budget_s']} s each phase). "
        f"Learning rates {p['lr']}. Test: {p['test_docs']} documents per domain (first {p['eval_chars']} "
        f"characters each); seeds {p['seeds']}.",
        "",
    ]
    for regime, by_domain in payload["table"].items():
        lines += [
            f"**{regime} regime** (test perplexity, mean ± std over seeds; lower is better)",
            "",
            "| domain | untouched | NOT standalone | NOT + recovery | organ in situ | LoRA r=8 | full FT |",
            "|---|---|---|---|---|---|---|",
        ]
        for domain, m in by_domain.items():
            cells = [f"{m[k]['mean']:.2f} ± {m[k]['std']:.2f}" for k in ("untouched", *METHODS)]
            lines.append(f"| {domain} | " + " | ".join(cells) + " |")
        lines.append("")
    sittings = payload.get("sittings") or []
    if len(sittings) > 1:
        lines += [
            f"Run in {len(sittings)} sittings with the same settings (`--resume`): "
            + "; ".join(
                f"{', '.join(f'{d} seed {s}' for d, s in sitting['runs'])} ({sitting['wall_clock_s'] / 60:.0f} min)"
                for sitting in sittings
            )
            + f". Total {payload['wall_clock_s'] / 60:.0f} min.",
            "",
        ]
    if payload.get("integrity"):
        i = payload["integrity"]
        lines += [
            f"Checkpoint integrity (an organ with 1e-3 noise on every weight, replacing layers 6-8): perplexity "
            f"{i['perplexity_here']:.6f} before the Hub round trip, "
            f"{i['perplexity_after_hub_round_trip']:.6f} after (relative difference "
            f"{i['relative_difference']:.1e}).",
            "",
        ]
    return "\n".join(lines)


def plot_sweeps(results: list[dict], path: Path) -> None:
    curves = {}
    for domain in sorted({r["domain"] for r in results}):
        rows = [r for r in results if r["domain"] == domain and "position_sweep_validation" in r]
        positions = sorted({int(p) for r in rows for p in r["position_sweep_validation"]})
        curves[domain] = [
            (
                p,
                statistics.fmean(
                    r["position_sweep_validation"][p if p in r["position_sweep_validation"] else str(p)]
                    / r["untouched"]["val_ppl"]
                    for r in rows
                ),
            )
            for p in positions
        ]
    sweep_figure(curves, baseline=1.0, ylabel="validation perplexity / untouched (no recovery)", path=path)


def main() -> None:
    parser = preset_parser(__doc__)
    parser.add_argument("--domains", nargs="+", default=None, help="override the preset's domains")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the (domain, seed) runs already in this preset's JSON (same settings required) and run the rest",
    )
    args = parser.parse_args()
    name = "full" if args.full else "quick"
    preset = dict(PRESETS[name])
    if args.domains:
        preset["domains"] = args.domains
    torch.manual_seed(0)
    recipient, tok = load_smollm2()
    t0 = time.time()
    results, previous_s, sittings = [], 0.0, []
    path = RESULTS / f"quality_{name}.json"
    if args.resume and path.exists():
        old = json.loads(path.read_text())
        if {k: v for k, v in old["settings"].items() if k != "domains"} != {
            k: v for k, v in preset.items() if k != "domains"
        }:
            raise SystemExit(f"--resume: {path} was run with other settings ({old['settings']}); run without --resume")
        results, previous_s = old["results"], old["wall_clock_s"]
        sittings = old.get("sittings") or [
            {"runs": [[r["domain"], r["seed"]] for r in results], "wall_clock_s": previous_s}
        ]
        preset["domains"] = list(dict.fromkeys(old["settings"]["domains"] + preset["domains"]))
    done = {(r["domain"], r["seed"]) for r in results}
    payload = {"preset": name, "settings": preset, "machine": machine(), "command": f"benchmarks/quality.py --{name}"}
    sittings.append({"runs": [], "wall_clock_s": 0.0})
    payload.update(results=results, table=summarise(results), sittings=sittings, wall_clock_s=previous_s)
    for domain in preset["domains"]:
        for seed in preset["seeds"]:
            if (domain, seed) in done:
                continue
            results.append(run_domain(domain, seed, preset, recipient, tok))
            sittings[-1].update(runs=sittings[-1]["runs"] + [[domain, seed]], wall_clock_s=round(time.time() - t0, 1))
            payload.update(
                results=results,
                table=summarise(results),
                sittings=sittings,
                wall_clock_s=round(previous_s + time.time() - t0, 1),
            )
            write_json(f"quality_{name}", payload)
    splits = DOMAINS[preset["domains"][0]]()
    payload["integrity"] = integrity_check(recipient, tok, held_out(splits.test, 8, preset["eval_chars"]))
    payload["wall_clock_s"] = round(previous_s + time.time() - t0, 1)
    write_json(f"quality_{name}", payload)
    plot_sweeps(results, RESULTS / f"quality_{name}_positions.png")
    write_markdown(f"quality_{name}", report(payload))
    print(report(payload))


if __name__ == "__main__":
    main()
