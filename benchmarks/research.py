"""Beyond the main table: the NOT paper's other research questions, and the protocol checks, on SmolLM2-135M.

    .venv/bin/python benchmarks/research.py --quick     # code (+ legal for the matrix), small grids (~10 min)
    .venv/bin/python benchmarks/research.py --full      # every part at full size (~76 min)

Parts (each is written to results/research_<preset>.json as soon as it ends; `--parts` runs a subset and
`--resume` keeps the parts a previous run of the same preset finished):

    lr         learning rate of every method chosen on validation from a grid (seed 0), test at the chosen rate
    epochs     the paper's default 5 epochs (training and recovery), every method at its validation-chosen rate
    positions  RQ2: every replace position, validation perplexity without and with recovery
    multi      RQ4: one, two (wide spacing) and three organs in one recipient, without and with joint recovery
    cross      RQ5: organs (and LoRA) trained on each domain, evaluated on every domain (matrix plot)
    size       RQ6: organ size k = 1, 2, 3, 4, 6 at its own slot and at an early slot, without and with recovery

Same data, splits and training loop as `quality.py` (16 blocks x 256 tokens of training, 12 validation and 24 test
documents per domain). Every recipient weight's sha256 is checked against the untouched model's after every part.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, Timer, load_smollm2, machine, preset_parser, write_json, write_markdown  # noqa: E402
from quality import METHODS, ORGAN, RATE_KEY, baseline_model, ppl, prepare, train_args  # noqa: E402
from quality import PRESETS as QUALITY  # noqa: E402

import not_hub  # noqa: E402
from not_hub.evaluation import position_sweep  # noqa: E402
from not_hub.integrity import tensor_sha256  # noqa: E402
from not_hub.plots import sweep_figure  # noqa: E402
from not_hub.training import OrganTrainingArguments, recover, train_organ  # noqa: E402

DATA_KEYS = ("train_blocks", "block", "val_docs", "test_docs", "eval_chars", "epochs", "recovery_epochs", "lr")
PRESETS = {
    "quick": dict(
        **{k: QUALITY["quick"][k] for k in DATA_KEYS if k not in ("train_blocks", "test_docs", "eval_chars")},
        # smoke sizes: half the training blocks and test documents of the main table, shorter documents
        train_blocks=QUALITY["quick"]["train_blocks"] // 2,
        test_docs=QUALITY["quick"]["test_docs"] // 2,
        eval_chars=1000,
        lr_domains=["code"],
        lr_grid={"organ": [1e-3], "lora": [1e-3], "full": [1e-4]},
        epochs_domain="code",
        paper_epochs=2,
        positions="some",
        candidate_positions=[4, 10],
        organs=[[4, 7], [10, 13], [20, 23]],
        cross_domains=["code", "legal"],
        sizes=[1, 2],
        early_position=4,
    ),
}
PRESETS["full"] = {
    **PRESETS["quick"],
    **{k: QUALITY["full"][k] for k in DATA_KEYS},  # the main table's data and training sizes
    "lr_domains": ["code", "legal", "biomedical", "general"],
    "lr_grid": {"organ": [1e-4, 3e-4, 1e-3], "lora": [3e-4, 1e-3, 3e-3], "full": [3e-5, 1e-4, 3e-4]},
    "paper_epochs": 5,
    "positions": "all",
    "candidate_positions": [4, 10, 14],
    "cross_domains": ["code", "legal", "biomedical", "general"],
    "sizes": [1, 2, 3, 4, 6],
}
SEED = 0


def state_sha256(model) -> dict[str, str]:
    """sha256 of every weight, to check that each part leaves the recipient bit-identical."""
    return {name: tensor_sha256(t) for name, t in model.state_dict().items()}


def args_for(preset: dict, lr: float, epochs: float | None = None) -> dict:
    return train_args(preset, SEED, lr, budget=False, epochs=epochs)


def trained_organ(recipient, data, preset, lr, layer_range=ORGAN, epochs=None):
    organ = not_hub.extract_organ(recipient, layer_range=tuple(layer_range))
    metrics = train_organ(organ, recipient, data, method="standalone", **args_for(preset, lr, epochs))
    return organ, metrics


def not_with_recovery(organ, recipient, data, preset, lr, position, docs: dict, epochs=None) -> dict:
    """Transplant (replace) at `position`, score `docs` ({name: documents}); recover (radius 1); score again."""
    with organ.transplanted(recipient, position=position) as transplant:
        before = {name: ppl(recipient, d, TOK) for name, d in docs.items()}
        with Timer() as t:
            recover(recipient, transplant, data, radius=1, **args_for(preset, lr, epochs or preset["recovery_epochs"]))
        after = {name: ppl(recipient, d, TOK) for name, d in docs.items()}
    return {"without_recovery": before, "with_recovery": after, "recovery_s": round(t.seconds, 1)}


def baseline(kind, recipient, data, preset, lr, docs: dict, epochs=None) -> dict:
    model, metrics = baseline_model(kind, recipient, data, OrganTrainingArguments(**args_for(preset, lr, epochs)))
    out = {name: ppl(model, d, TOK) for name, d in docs.items()}
    out["train_s"] = metrics.wall_clock_s
    return out


def in_situ(recipient, data, preset, lr, docs: dict, epochs=None) -> dict:
    organ = not_hub.extract_organ(recipient, layer_range=ORGAN)
    metrics = train_organ(organ, recipient, data, method="in_situ", **args_for(preset, lr, epochs))
    with organ.transplanted(recipient, position=ORGAN[0]):
        out = {name: ppl(recipient, d, TOK) for name, d in docs.items()}
    out["train_s"] = metrics.wall_clock_s
    return out


def part_lr(recipient, preset, payload) -> dict:
    """Each method trained at every rate of its grid (1 epoch, seed 0); the rate is chosen on validation."""
    grid = preset["lr_grid"]
    out = {}
    for domain in preset["lr_domains"]:
        data, val, test = prepare(domain, SEED, preset, TOK)
        docs = {"val": val, "test": test}
        runs = {m: {} for m in METHODS}
        for lr in grid["organ"]:
            organ, _ = trained_organ(recipient, data, preset, lr)
            r = not_with_recovery(organ, recipient, data, preset, lr, ORGAN[0], docs)
            runs["not_standalone"][lr] = r["without_recovery"]
            runs["not_recovered"][lr] = r["with_recovery"]
            runs["organ_in_situ"][lr] = in_situ(recipient, data, preset, lr, docs)
        for lr in grid["lora"]:
            runs["lora_r8"][lr] = baseline("lora", recipient, data, preset, lr, docs)
        for lr in grid["full"]:
            runs["full_finetune"][lr] = baseline("full", recipient, data, preset, lr, docs)
        chosen = {m: min(r, key=lambda lr, r=r: r[lr]["val"]) for m, r in runs.items()}
        out[domain] = {
            "untouched": {name: ppl(recipient, d, TOK) for name, d in docs.items()},
            "runs": {m: {str(lr): v for lr, v in r.items()} for m, r in runs.items()},
            "chosen_lr": chosen,
            "test_at_chosen_lr": {m: runs[m][chosen[m]]["test"] for m in METHODS},
        }
        print(f"  lr {domain}: chosen {chosen}", flush=True)
    return out


def chosen_lr(payload: dict, preset: dict, domain: str) -> dict:
    """Validation-chosen rates from the lr part when it covered `domain`, else the main table's fixed rates."""
    lr_part = payload["parts"].get("lr", {}).get(domain)
    if lr_part:
        return {**lr_part["chosen_lr"], "source": "validation (lr part)"}
    return {**{m: preset["lr"][RATE_KEY[m]] for m in METHODS}, "source": "fixed (main table)"}


def part_epochs(recipient, preset, payload) -> dict:
    """The paper's default schedule: every method (and recovery) trained for `paper_epochs` epochs."""
    domain, epochs = preset["epochs_domain"], preset["paper_epochs"]
    data, val, test = prepare(domain, SEED, preset, TOK)
    lrs = chosen_lr(payload, preset, domain)
    res = {}
    with Timer() as t:
        organ, _ = trained_organ(recipient, data, preset, lrs["not_recovered"], epochs=epochs)
    rows = position_sweep(
        organ, recipient, val, tokenizer=TOK, positions=preset["candidate_positions"], max_length=512, progress=False
    ).rows
    sweep = {r["position"]: r["perplexity"] for r in rows}
    best = min(sweep, key=sweep.get)
    r = not_with_recovery(organ, recipient, data, preset, lrs["not_recovered"], best, {"test": test}, epochs=epochs)
    res["not_standalone"] = {"test": r["without_recovery"]["test"], "train_s": round(t.seconds, 1), "position": best}
    res["not_recovered"] = {"test": r["with_recovery"]["test"], "train_s": round(t.seconds + r["recovery_s"], 1)}
    res["organ_in_situ"] = in_situ(recipient, data, preset, lrs["organ_in_situ"], {"test": test}, epochs=epochs)
    res["lora_r8"] = baseline("lora", recipient, data, preset, lrs["lora_r8"], {"test": test}, epochs=epochs)
    res["full_finetune"] = baseline("full", recipient, data, preset, lrs["full_finetune"], {"test": test}, epochs)
    return {
        "domain": domain,
        "epochs": epochs,
        "lr": lrs,
        "validation_positions": sweep,
        "untouched": {"test": ppl(recipient, test, TOK)},
        "methods": res,
    }


def part_positions(recipient, preset, payload) -> dict:
    """RQ2: the organ (trained once) at every valid replace position, validation perplexity w/o and with recovery."""
    data, val, test = prepare("code", SEED, preset, TOK)
    lr = preset["lr"]["organ"]
    organ, _ = trained_organ(recipient, data, preset, lr)
    k, depth = ORGAN[1] - ORGAN[0], recipient.config.num_hidden_layers
    positions = list(range(depth - k + 1)) if preset["positions"] == "all" else preset["candidate_positions"]
    rows = {}
    for p in positions:
        rows[p] = not_with_recovery(organ, recipient, data, preset, lr, p, {"val": val})
        print(f"  position {p}: {rows[p]['without_recovery']['val']:.2f} -> {rows[p]['with_recovery']['val']:.2f}")
    untouched = ppl(recipient, val, TOK)
    summary = {}
    for key in ("without_recovery", "with_recovery"):
        values = [rows[p][key]["val"] for p in positions]
        best = positions[values.index(min(values))]
        rec = not_with_recovery(organ, recipient, data, preset, lr, best, {"test": test})
        summary[key] = {
            "mean": statistics.fmean(values),
            "std": statistics.pstdev(values),
            "std_of_log": statistics.pstdev([math.log(v) for v in values]),
            "best_position": best,
            "test_at_best": rec[key]["test"],
        }
    return {
        "domain": "code",
        "untouched": {"val": untouched, "test": ppl(recipient, test, TOK)},
        "rows": rows,
        "summary": summary,
    }


def part_multi(recipient, preset, payload) -> dict:
    """RQ4: organs trained standalone from layers A, B, C; one (B), two widely spaced (A, C), three (A, B, C), each
    transplanted at its own slot; then the organs and their neighbours (radius 1) recovered jointly."""
    data, _, test = prepare("code", SEED, preset, TOK)
    lr = preset["lr"]["organ"]
    organs = [trained_organ(recipient, data, preset, lr, layer_range=r)[0] for r in preset["organs"]]
    a, b, c = organs
    out = {"domain": "code", "organs": preset["organs"], "untouched": {"test": ppl(recipient, test, TOK)}}
    for name, group in (("one", [b]), ("two", [a, c]), ("three", [a, b, c])):
        with ExitStack() as stack:
            transplants = [
                stack.enter_context(o.transplanted(recipient, position=o.config.layer_range[0])) for o in group
            ]
            before = ppl(recipient, test, TOK)
            metrics = recover(
                recipient, transplants, data, radius=1, **args_for(preset, lr, preset["recovery_epochs"])
            )
            after = ppl(recipient, test, TOK)
            params = list(
                {
                    id(p): p
                    for t in transplants
                    for layer in [*t.layers, *t.neighbour_layers(1)]
                    for p in layer.parameters()
                }.values()
            )
        out[name] = {
            "layer_ranges": [list(o.config.layer_range) for o in group],
            "test_without_recovery": before,
            "test_with_recovery": after,
            "recovery_trainable_params": sum(p.numel() for p in params),
            "recovery_s": metrics.wall_clock_s,
        }
        print(f"  {name}: {before:.2f} -> {after:.2f}", flush=True)
    return out


def part_cross(recipient, preset, payload) -> dict:
    """RQ5: an organ (and, for reference, LoRA) trained on each domain, scored on every domain's test documents."""
    domains = preset["cross_domains"]
    prepared = {d: prepare(d, SEED, preset, TOK) for d in domains}
    tests = {d: prepared[d][2] for d in domains}
    lr = preset["lr"]
    out = {"domains": domains, "untouched": {d: ppl(recipient, t, TOK) for d, t in tests.items()}}
    for trained_on in domains:
        data = prepared[trained_on][0]
        organ, _ = trained_organ(recipient, data, preset, lr["organ"])
        r = not_with_recovery(organ, recipient, data, preset, lr["organ"], ORGAN[0], tests)
        out.setdefault("not_standalone", {})[trained_on] = r["without_recovery"]
        out.setdefault("not_recovered", {})[trained_on] = r["with_recovery"]
        lora = baseline("lora", recipient, data, preset, lr["lora"], tests)
        out.setdefault("lora_r8", {})[trained_on] = {d: lora[d] for d in domains}
        print(f"  cross: trained on {trained_on}", flush=True)
    return out


def part_size(recipient, preset, payload) -> dict:
    """RQ6: organs of k layers from layer 10, at their own slot and at an early slot, without and with recovery."""
    data, _, test = prepare("code", SEED, preset, TOK)
    lr = preset["lr"]["organ"]
    out = {"domain": "code", "untouched": {"test": ppl(recipient, test, TOK)}, "sizes": {}}
    for k in preset["sizes"]:
        layer_range = (ORGAN[0], ORGAN[0] + k)
        with Timer() as t:
            organ, metrics = trained_organ(recipient, data, preset, lr, layer_range=layer_range)
        row = {
            "layer_range": list(layer_range),
            "parameters": sum(p.numel() for p in organ.parameters()),
            "train_s": round(t.seconds, 1),
            "wrapper_validation_loss": metrics.best_validation_loss,
        }
        for where, position in (("own_slot", ORGAN[0]), ("early", preset["early_position"])):
            r = not_with_recovery(organ, recipient, data, preset, lr, position, {"test": test})
            row[where] = {
                "position": position,
                "test_without_recovery": r["without_recovery"]["test"],
                "test_with_recovery": r["with_recovery"]["test"],
            }
        out["sizes"][k] = row
        print(f"  k={k}: {row}", flush=True)
    return out


# Each part takes (recipient, preset, payload): `epochs` reads the rates the `lr` part chose from the payload.
PARTS = {
    "lr": part_lr,
    "epochs": part_epochs,
    "positions": part_positions,
    "multi": part_multi,
    "cross": part_cross,
    "size": part_size,
}


# ----------------------------------------------------------------------------------------------- reporting


def fmt(x: float) -> str:
    return f"{x:.2f}"


def report(payload: dict) -> str:
    parts, p = payload["parts"], payload["settings"]
    lines = [f"### Research questions ({payload['preset']} preset, seed {SEED})", ""]
    if "lr" in parts:
        lines += [
            "**Learning rate chosen on validation** (1 epoch; grid "
            + ", ".join(f"{k}: {v}" for k, v in p["lr_grid"].items())
            + "; NOT standalone, NOT + recovery and the in-situ organ share the organ grid). Test perplexity at the "
            "validation-chosen rate (rate in brackets):",
            "",
            "| domain | untouched | NOT standalone | NOT + recovery | organ in situ | LoRA r=8 | full FT |",
            "|---|---|---|---|---|---|---|",
        ]
        for domain, r in parts["lr"].items():
            cells = [f"{r['test_at_chosen_lr'][m]:.2f} ({r['chosen_lr'][m]:g})" for m in METHODS]
            lines.append(f"| {domain} | {fmt(r['untouched']['test'])} | " + " | ".join(cells) + " |")
        lines.append("")
    if "epochs" in parts:
        e = parts["epochs"]
        m = e["methods"]
        lines += [
            f"**{e['epochs']} epochs** for training and recovery (the paper's default is 5; {e['domain']}; rates: "
            f"{e['lr']['source']}; organ position chosen on validation among {list(e['validation_positions'])}: "
            f"{m['not_standalone']['position']}). Test perplexity (training seconds):",
            "",
            "| untouched | NOT standalone | NOT + recovery | organ in situ | LoRA r=8 | full FT |",
            "|---|---|---|---|---|---|",
            f"| {fmt(e['untouched']['test'])} | "
            + " | ".join(f"{m[k]['test']:.2f} ({m[k]['train_s']:.0f} s)" for k in METHODS)
            + " |",
            "",
        ]
    if "positions" in parts:
        s = parts["positions"]
        lines += [
            f"**Position sensitivity (RQ2)**, {s['domain']}, every replace position of the layers "
            f"{list(ORGAN)} organ, validation perplexity (untouched {fmt(s['untouched']['val'])}):",
            "",
            "| | mean over positions | std | std of log | best position | test at best (untouched "
            f"{fmt(s['untouched']['test'])}) |",
            "|---|---|---|---|---|---|",
        ]
        for key, label in (("without_recovery", "without recovery"), ("with_recovery", "with recovery")):
            v = s["summary"][key]
            lines.append(
                f"| {label} | {fmt(v['mean'])} | {fmt(v['std'])} | {v['std_of_log']:.2f} | {v['best_position']} | "
                f"{fmt(v['test_at_best'])} |"
            )
        lines += ["", f"![positions](research_{payload['preset']}_positions.png)", ""]
    if "multi" in parts:
        mu = parts["multi"]
        lines += [
            f"**Multi-organ (RQ4)**, {mu['domain']}, organs at their own slots, test perplexity (untouched "
            f"{fmt(mu['untouched']['test'])}):",
            "",
            "| organs | layers | without recovery | with joint recovery (radius 1) | recovery trainable parameters |",
            "|---|---|---|---|---|",
        ]
        for name in ("one", "two", "three"):
            r = mu[name]
            lines.append(
                f"| {name} | {r['layer_ranges']} | {fmt(r['test_without_recovery'])} | "
                f"{fmt(r['test_with_recovery'])} | {r['recovery_trainable_params'] / 1e6:.1f} M |"
            )
        lines.append("")
    if "cross" in parts:
        c = parts["cross"]
        lines += [
            "**Cross-domain (RQ5)**: test perplexity / untouched, rows = trained on, columns = evaluated on "
            "(NOT + recovery; standalone and LoRA in the plot and JSON):",
            "",
            "| trained on \\ evaluated on | " + " | ".join(c["domains"]) + " |",
            "|---|" + "---|" * len(c["domains"]),
        ]
        for t in c["domains"]:
            lines.append(
                f"| {t} | "
                + " | ".join(f"{c['not_recovered'][t][e] / c['untouched'][e]:.3f}" for e in c["domains"])
                + " |"
            )
        lines += ["", f"![cross-domain](research_{payload['preset']}_cross.png)", ""]
    if "size" in parts:
        z = parts["size"]
        lines += [
            f"**Organ size (RQ6)**, {z['domain']}, organs starting at layer {ORGAN[0]}, test perplexity (untouched "
            f"{fmt(z['untouched']['test'])}):",
            "",
            "| k | parameters | train s | wrapper val loss | own slot | own slot + recovery | early slot "
            f"({p['early_position']}) | early + recovery |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for k, r in z["sizes"].items():
            lines.append(
                f"| {k} | {r['parameters'] / 1e6:.1f} M | {r['train_s']:.0f} | {r['wrapper_validation_loss']:.2f} | "
                f"{fmt(r['own_slot']['test_without_recovery'])} | {fmt(r['own_slot']['test_with_recovery'])} | "
                f"{fmt(r['early']['test_without_recovery'])} | {fmt(r['early']['test_with_recovery'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts, name = payload["parts"], payload["preset"]
    if "positions" in parts:
        s = parts["positions"]
        positions = sorted(int(p) for p in s["rows"])
        sweep_figure(
            {
                label: [
                    (p, s["rows"][p if p in s["rows"] else str(p)][key]["val"] / s["untouched"]["val"])
                    for p in positions
                ]
                for key, label in (("without_recovery", "organ only"), ("with_recovery", "organ + recovery"))
            },
            baseline=1.0,
            ylabel="validation perplexity / untouched",
            title=f"{s['domain']}: organ of donor layers {list(ORGAN)} at every position",
            own_slot=ORGAN[0],
            path=RESULTS / f"research_{name}_positions.png",
        )
    if "cross" in parts:
        c = parts["cross"]
        d = c["domains"]
        kinds = [("not_standalone", "NOT organ only"), ("not_recovered", "NOT + recovery"), ("lora_r8", "LoRA r=8")]
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        for ax, (kind, title) in zip(axes, kinds, strict=True):
            m = [[c[kind][t][e] / c["untouched"][e] for e in d] for t in d]
            im = ax.imshow(m, cmap="RdYlGn_r", vmin=0.6, vmax=1.4)
            for i in range(len(d)):
                for j in range(len(d)):
                    ax.text(j, i, f"{m[i][j]:.2f}", ha="center", va="center", fontsize=9)
            ax.set_xticks(range(len(d)), d, rotation=30)
            ax.set_yticks(range(len(d)), d)
            ax.set_xlabel("evaluated on")
            ax.set_title(title)
        axes[0].set_ylabel("trained on")
        fig.colorbar(im, ax=axes, label="test perplexity / untouched", shrink=0.8)
        fig.savefig(RESULTS / f"research_{name}_cross.png", dpi=120, bbox_inches="tight")
        plt.close(fig)


def main() -> None:
    global TOK
    parser = preset_parser(__doc__)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="run only these parts")
    parser.add_argument("--resume", action="store_true", help="keep the parts this preset's JSON already has")
    args = parser.parse_args()
    name = "full" if args.full else "quick"
    preset = PRESETS[name]
    path = RESULTS / f"research_{name}.json"
    payload = {"preset": name, "settings": preset, "machine": machine(), "command": f"benchmarks/research.py --{name}"}
    payload.update(parts={}, seconds={}, recipient_unchanged={})
    if args.resume and path.exists():
        old = json.loads(path.read_text())
        if old["settings"] != json.loads(json.dumps(preset)):
            raise SystemExit(f"--resume: {path} was run with other settings; run without --resume")
        payload.update(parts=old["parts"], seconds=old["seconds"], recipient_unchanged=old["recipient_unchanged"])
    torch.manual_seed(0)
    recipient, TOK = load_smollm2()
    reference = state_sha256(recipient)
    for part in args.parts:
        if part in payload["parts"]:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {part}", flush=True)
        with Timer() as t:
            payload["parts"][part] = PARTS[part](recipient, preset, payload)
        payload["seconds"][part] = round(t.seconds, 1)
        payload["recipient_unchanged"][part] = state_sha256(recipient) == reference
        write_json(f"research_{name}", payload)
    plot(payload)
    write_markdown(f"research_{name}", report(payload))
    print(report(payload))


TOK = None

if __name__ == "__main__":
    main()
