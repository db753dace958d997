"""Gain by repo id: does an organ pulled from the Hub make a fresh recipient better, as much as LoRA, at equal time?

For each domain and seed, every method trains on the same blocks for the same wall-clock budget (validation time
excluded) with a learning rate chosen on validation from a grid (short selection runs; a choice at the grid's edge
extends the grid one step past it). The chosen run's artifact is pushed to a local Hub-protocol server
(tests/fixtures/hub_server.py), pulled by repo id in a fresh process into a fresh SmolLM2-135M (LoRA through
`PeftModel.from_pretrained`, organs through `OrganModel.from_pretrained(...).transplant_into(recipient)` with the
organ's own defaults) and scored on test, beside the untouched model.

Methods: the paper's standalone organ (layers [10, 13)); standalone + recovery (half the budget each) exported as one
organ carrying its recovered neighbours; the organ trained in situ with the cached prefix at the better of a middle
slot [10, 13) and the tail [27, 30) (chosen on validation); peft LoRA r=8 on q,k,v,o and on every linear layer; full
fine-tuning as a reference (scored in-process: a full checkpoint is not an artifact anyone would pull).

    python benchmarks/gain.py --quick        # smoke: tiny budgets, code, seed 0
    python benchmarks/gain.py --preset code  # code, seed 0, 120 s per method
    python benchmarks/gain.py --full         # four domains, seeds 0-2 on code, 120 s per method
    python benchmarks/gain.py --full --only legal:0,general:0   # some of them; the others already on record are kept

Each finished domain-seed is written at once to results/gain_runs/<preset>-<domain>-<seed>.json, and the preset's
JSON, table and plot are rebuilt from every run on record, so a long preset can be run in parts (a run that is killed
loses only the domain-seed in progress).

Slot selection: the in-situ selection runs of one slot share one prefix cache (built once, its time recorded) so
each selection run gets the same training time whatever the slot's depth; the final run builds its own cache inside
its budget.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "fixtures"))
from hub_server import LocalHub  # noqa: E402

# The converted SmolLM2 stays where it is cached normally, although HF_HOME is redirected below.
os.environ.setdefault(
    "NOT_HUB_CACHE", str(Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "not_hub")
)
# huggingface_hub reads its endpoint at import: start the local Hub first.
HUB = LocalHub().start()
HF_HOME = tempfile.mkdtemp(prefix="not_hub-gain-")
HUB_ENV = dict(
    HF_ENDPOINT=HUB.endpoint,
    HF_HOME=HF_HOME,
    HF_TOKEN="bench",
    HF_HUB_DISABLE_XET="1",
    HF_HUB_DISABLE_PROGRESS_BARS="1",
)
os.environ.update(HUB_ENV)

import torch  # noqa: E402
from common import RESULTS, load_smollm2, machine, run_fresh, write_json, write_markdown  # noqa: E402
from domains import DOMAINS  # noqa: E402
from quality import held_out, ppl  # noqa: E402

import not_hub  # noqa: E402
from not_hub.data import BlockData, make_blocks  # noqa: E402
from not_hub.prefix_cache import PrefixCache  # noqa: E402
from not_hub.training import OrganTrainingArguments, fit_parameters, recover, train_organ  # noqa: E402

ORGAN, TAIL = (10, 13), (27, 30)
# The in-situ slots the organ may take (chosen on validation). v3 added the 6-layer ones: at 3 layers the organ trails
# LoRA on all linear layers on prose, and a wider organ is the cheapest way to give it more capacity.
SLOTS = {
    "in_situ_middle": ORGAN,
    "in_situ_tail": TAIL,
    "in_situ_middle6": (10, 16),
    "in_situ_tail6": (24, 30),
}
SAVE_DIR: Path | None = None  # --save-organs: keep the trained organs (e.g. for the Space)
PRESETS = {
    "quick": dict(
        domains=["code"], seeds={"code": [0]}, budget_s=6, select_s=3, train_blocks=16, block=256, val_docs=8,
        test_docs=12, eval_chars=1200, batch_size=4,
    ),
    "code": dict(
        domains=["code"], seeds={"code": [0]}, budget_s=120, select_s=20, train_blocks=128, block=256, val_docs=24,
        test_docs=48, eval_chars=1500, batch_size=4,
    ),
}  # fmt: skip
PRESETS["full"] = {
    **PRESETS["code"],
    "domains": ["code", "legal", "biomedical", "general"],
    "seeds": {"code": [0, 1, 2], "legal": [0], "biomedical": [0], "general": [0]},
}
GRIDS = {
    "standalone": [3e-4, 1e-3, 3e-3],
    "standalone_recovered": [3e-4, 1e-3, 3e-3],
    "in_situ_middle": [3e-4, 1e-3, 3e-3],
    "in_situ_tail": [3e-4, 1e-3, 3e-3],
    "in_situ_middle6": [3e-4, 1e-3, 3e-3],
    "in_situ_tail6": [3e-4, 1e-3, 3e-3],
    "lora_qkvo": [1e-3, 3e-3, 1e-2],
    "lora_all": [1e-3, 3e-3, 1e-2],
    "full_ft": [3e-5, 1e-4, 3e-4],
}
LORA_TARGETS = {
    "lora_qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "lora_all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def every_block(data: BlockData) -> list:
    """Training and validation blocks: what a learning-rate sweep's shared prefix cache is filled with once."""
    return [data.train[:]["input_ids"], *([data.validation[:]["input_ids"]] if data.validation is not None else [])]


def args_for(preset: dict, seed: int, lr: float, seconds: float) -> dict:
    """A wall-clock budget: as many steps as fit, at a constant rate (the recorded runs' protocol: their schedule was
    laid out over 50 epochs, so near-constant within the budget; not_hub's default now decays over the budget)."""
    return dict(
        epochs=preset.get("epochs", 50), lr=lr, warmup_ratio=0.0, batch_size=preset["batch_size"], seed=seed, progress=False,
        max_seconds=seconds, trainer_args={"lr_scheduler_type": "constant"},
    )  # fmt: skip


def prepare(domain: str, seed: int, preset: dict, tok) -> tuple[BlockData, list[str], list[str]]:
    splits = DOMAINS[domain]()
    blocks = make_blocks(splits, tok, preset["block"], seed=seed)
    train = blocks.train.select(range(min(preset["train_blocks"], len(blocks.train))))
    data = BlockData(
        train=train,
        validation=blocks.validation.select(range(min(8, len(blocks.validation)))),
        description={"domain": domain, "train_blocks": len(train), "block_size": preset["block"]},
    )
    return (
        data,
        held_out(splits.validation, preset["val_docs"], preset["eval_chars"]),
        held_out(splits.test, preset["test_docs"], preset["eval_chars"]),
    )


# --------------------------------------------------------------------------------------------- one method, one run


def train_method(
    method: str, recipient, data: BlockData, preset: dict, seed: int, lr: float, seconds: float, prefix_cache=None
):
    """Train `method` for `seconds`; return (artifact, metrics dict). The recipient is left untouched."""
    torch.manual_seed(seed)
    if method in ("standalone", "standalone_recovered"):
        organ = not_hub.extract_organ(recipient, layer_range=ORGAN)
        first = seconds / 2 if method == "standalone_recovered" else seconds
        m = train_organ(organ, recipient, data, method="standalone", **args_for(preset, seed, lr, first))
        info = {"tokens_seen": m.tokens_seen, "train_s": m.wall_clock_s - m.validation_s}
        if method == "standalone_recovered":
            with organ.transplanted(recipient) as transplant:
                r = recover(recipient, transplant, data, radius=1, **args_for(preset, seed, lr, seconds / 2))
                organ = transplant.to_organ()  # the organ and the two recovered neighbours, as one organ
            info = {
                "tokens_seen": m.tokens_seen + r.tokens_seen,
                "train_s": info["train_s"] + r.wall_clock_s - r.validation_s,
            }
        return organ, info
    if method in SLOTS:
        organ = not_hub.extract_organ(recipient, layer_range=SLOTS[method])
        m = train_organ(
            organ, recipient, data, method="in_situ", prefix_cache=prefix_cache, **args_for(preset, seed, lr, seconds)
        )
        cache_s = (organ.config.training.get("prefix_cache") or {}).get("build_s", 0.0)  # counted in the budget
        return organ, {"tokens_seen": m.tokens_seen, "train_s": m.wall_clock_s - m.validation_s + cache_s}
    model = copy.deepcopy(recipient)
    if method in LORA_TARGETS:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS[method])
        )
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = list(model.parameters())
    m = fit_parameters(model, params, data, OrganTrainingArguments(**args_for(preset, seed, lr, seconds)), method)
    return model.eval(), {"tokens_seen": m.tokens_seen, "train_s": m.wall_clock_s - m.validation_s}


def score_in_process(artifact, recipient, docs, tok) -> float:
    if isinstance(artifact, not_hub.OrganModel):
        with artifact.transplanted(recipient):
            return ppl(recipient, docs, tok)
    return ppl(artifact, docs, tok)


def artifact_parameters(artifact) -> int:
    if isinstance(artifact, not_hub.OrganModel):
        return sum(p.numel() for p in artifact.parameters())
    trainable = [p for n, p in artifact.named_parameters() if "lora_" in n]
    return sum(p.numel() for p in trainable) or sum(p.numel() for p in artifact.parameters())


PULL_AND_SCORE = """
import json, sys
sys.path.insert(0, {here!r})
from common import load_smollm2
import not_hub
from not_hub.evaluation import perplexity
kind, repo_id, docs_path = sys.argv[1], sys.argv[2], sys.argv[3]
model, tok = load_smollm2()  # a fresh recipient in a fresh process
if kind == "organ":
    organ = not_hub.OrganModel.from_pretrained(repo_id)  # by repo id, sha256 of every tensor checked
    organ.transplant_into(model)  # the organ's own defaults: its slot, or the splice that carries its neighbours
else:
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, repo_id)
print(json.dumps(perplexity(model, json.load(open(docs_path)), tokenizer=tok, max_length=512).perplexity))
"""


def push_pull_score(artifact, repo_id: str, test: list[str]) -> float:
    kind = "organ" if isinstance(artifact, not_hub.OrganModel) else "lora"
    artifact.push_to_hub(repo_id)
    return run_fresh(PULL_AND_SCORE.format(here=str(HERE)), [kind, repo_id], test, HUB_ENV, f"pulling {repo_id}")


# ------------------------------------------------------------------------------------------------ one domain-seed


def select(method: str, recipient, data: BlockData, val: list[str], preset: dict, seed: int, tok) -> dict:
    """Choose `method`'s learning rate on validation with short runs; a choice at the grid's edge extends it."""
    cache, build_s = None, None
    if method in SLOTS:  # one prefix cache shared by the slot's selection runs
        t0 = time.perf_counter()
        cache = PrefixCache.build(recipient, SLOTS[method][0], every_block(data), batch_size=preset["batch_size"])
        build_s = round(time.perf_counter() - t0, 2)
    grid = GRIDS[method]
    tried = {}
    queue = list(grid)
    while queue:
        lr = queue.pop(0)
        artifact, _ = train_method(method, recipient, data, preset, seed, lr, preset["select_s"], cache)
        tried[lr] = score_in_process(artifact, recipient, val, tok)
        del artifact
        best = min(tried, key=tried.get)
        ordered = sorted(tried)
        if not queue and best in (ordered[0], ordered[-1]) and len(tried) < len(grid) + 2:
            queue.append(best / 3 if best == ordered[0] else best * 3)  # extend past the edge (twice at most)
    best = min(tried, key=tried.get)
    ordered = sorted(tried)
    out = {
        "validation_ppl": {f"{k:g}": v for k, v in sorted(tried.items())},
        "chosen_lr": best,
        "at_grid_edge": best in (ordered[0], ordered[-1]),
    }
    if build_s is not None:
        out["prefix_cache_build_s"] = build_s
    print(
        f"[{data.description['domain']} seed {seed}] {method}: lr {best:g} (validation {tried[best]:.3f})", flush=True
    )
    return out


def final(method: str, lr: float, recipient, data: BlockData, test: list[str], preset: dict, seed: int, tok) -> dict:
    """Train `method` for the full budget, push it, pull it by repo id in a fresh process and score it on test."""
    domain = data.description["domain"]
    artifact, info = train_method(method, recipient, data, preset, seed, lr, preset["budget_s"])
    row = {
        "lr": lr,
        **info,
        "tokens_per_second": info["tokens_seen"] / max(info["train_s"], 1e-9),
        "artifact_parameters": artifact_parameters(artifact),
    }
    row["artifact_bytes_bf16"] = 2 * row["artifact_parameters"]
    if method == "full_ft":
        row["test_ppl"] = score_in_process(artifact, recipient, test, tok)
        row["scored"] = "in process (reference; not pushed)"
    else:
        repo_id = f"bench/{domain}-{seed}-{method.replace('_', '-')}"
        row["in_process_test_ppl"] = score_in_process(artifact, recipient, test, tok)
        row["test_ppl"] = push_pull_score(artifact, repo_id, test)
        row["scored"] = f"pulled by repo id {repo_id} in a fresh process into a fresh recipient"
    if SAVE_DIR is not None and isinstance(artifact, not_hub.OrganModel):
        artifact.save_pretrained(SAVE_DIR / f"{domain}-{seed}-{method}")
    print(f"[{domain} seed {seed}] {method}: test {row['test_ppl']:.3f}", flush=True)
    return row


def best_slot(run: dict) -> str:
    return min(
        (m for m in SLOTS if m in run["selection"]), key=lambda m: min(run["selection"][m]["validation_ppl"].values())
    )


def add_ratios(run: dict) -> None:
    results = run["results"]
    best_lora = min(results["lora_qkvo"]["test_ppl"], results["lora_all"]["test_ppl"])
    for row in [*results.values(), *(s["row"] for s in run.get("superseded_in_situ", []))]:
        row["ratio_to_untouched"] = row["test_ppl"] / run["untouched"]["test"]
        row["ratio_to_best_lora"] = row["test_ppl"] / best_lora


def run_one(domain: str, seed: int, preset: dict, recipient, tok) -> dict:
    data, val, test = prepare(domain, seed, preset, tok)
    untouched = {"validation": ppl(recipient, val, tok), "test": ppl(recipient, test, tok)}
    out = {"domain": domain, "seed": seed, "untouched": untouched, "data": data.description, "selection": {}}
    for method in GRIDS:  # learning rates (and the in-situ slot) chosen on validation
        out["selection"][method] = select(method, recipient, data, val, preset, seed, tok)
    slot = out["in_situ_slot"] = best_slot(out)
    results = {}
    for method in ["standalone", "standalone_recovered", slot, "lora_qkvo", "lora_all", "full_ft"]:
        row = final(method, out["selection"][method]["chosen_lr"], recipient, data, test, preset, seed, tok)
        results["in_situ" if method == slot else method] = row
    out["results"] = results
    add_ratios(out)
    return out


def upgrade(run: dict, preset: dict, recipient, tok) -> dict:
    """Bring a run on record up to the current protocol: select the in-situ slots it lacks (or whose selection the
    old protocol got wrong), and if validation now prefers another slot, train and score that slot's final. The
    other methods' finals are kept: same blocks, same test documents, same budget."""
    domain, seed = run["domain"], run["seed"]
    data, val, test = prepare(domain, seed, preset, tok)
    check = ppl(recipient, val, tok)
    if abs(check - run["untouched"]["validation"]) > 1e-3 * check:
        raise SystemExit(f"{domain}:{seed}: untouched validation {check:.4f} != {run['untouched']['validation']:.4f} "
                         "on record: the data changed, rerun it whole with --only")  # fmt: skip
    started = time.time()
    # v1 built each slot's prefix cache inside its 20 s selection runs (the tail never trained, the middle slot lost
    # ~17 s of its 20): every slot is selected again.
    v1 = run.get("protocol", PROTOCOL_V1) == PROTOCOL_V1
    redo = [m for m in SLOTS if v1 or m not in run["selection"]]
    for method in redo:
        run["selection"][method] = select(method, recipient, data, val, preset, seed, tok)
    slot = best_slot(run)
    lr = run["selection"][slot]["chosen_lr"]
    if slot != run["in_situ_slot"] or lr != run["results"]["in_situ"]["lr"]:  # a new slot or learning rate: retrain
        run.setdefault("superseded_in_situ", []).append(
            {
                "slot": run["in_situ_slot"],
                "protocol": run.get("protocol", PROTOCOL_V1),
                "row": run["results"]["in_situ"],
            }
        )
        run["results"]["in_situ"] = final(slot, lr, recipient, data, test, preset, seed, tok)
        run["in_situ_slot"] = slot
    add_ratios(run)
    run.setdefault("upgrades", []).append(
        {"from": run.get("protocol", PROTOCOL_V1), "selected": redo, "wall_clock_s": round(time.time() - started, 1)}
    )
    run["protocol"] = PROTOCOL
    return run


def needs_upgrade(run: dict) -> bool:
    """An older protocol, or an in-situ final trained at another rate than its slot's selection chose."""
    chosen = run["selection"].get(run["in_situ_slot"], {}).get("chosen_lr")
    return run.get("protocol") != PROTOCOL or run["results"]["in_situ"]["lr"] != chosen


def slot_label(method: str) -> str:
    start, end = SLOTS[method]
    return f"{'tail' if end == TAIL[1] else 'middle'} slot, layers {start}-{end - 1}"


def row_line(run: dict, name: str, r: dict) -> str:
    return (
        f"| {run['domain']} | {run['seed']} | {name} | {r['lr']:g} | {r['test_ppl']:.3f} | "
        f"{r['ratio_to_untouched']:.3f} | {r['ratio_to_best_lora']:.3f} | {r['tokens_seen']:,} | "
        f"{r['tokens_per_second']:.0f} | {r['artifact_bytes_bf16'] / 1e6:.1f} MB |"
    )


def report(payload: dict) -> str:
    p = payload["settings"]
    lines = [
        f"### Gain by repo id ({payload['preset']} preset: {p['budget_s']} s of training per method, learning rates "
        f"chosen on validation with {p['select_s']} s selection runs; test perplexity of the artifact pulled by repo "
        "id into a fresh recipient)",
        "",
        "| domain | seed | method | lr | test ppl | / untouched | / best LoRA | tokens seen | tokens/s | artifact (bf16) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in payload["runs"]:
        lines.append(
            f"| {run['domain']} | {run['seed']} | untouched | | {run['untouched']['test']:.3f} | 1.000 | | | | |"
        )
        for method, r in run["results"].items():
            name = f"in_situ ({slot_label(run['in_situ_slot'])})" if method == "in_situ" else method
            lines.append(row_line(run, name, r))
        for old in run.get("superseded_in_situ", []):
            lines.append(row_line(run, f"in_situ ({slot_label(old['slot'])}; superseded on validation)", old["row"]))
    edges = [
        f"{run['domain']}/{run['seed']}/{m}"
        for run in payload["runs"]
        for m, s in run["selection"].items()
        if m in GRIDS and s["at_grid_edge"]
    ]
    lines += [
        "",
        "Learning-rate choices still at the edge of the grid after extending it twice: "
        + (", ".join(edges) or "none")
        + ".",
    ]
    protocols = {}
    for run in payload["runs"]:
        protocols.setdefault(run.get("protocol", PROTOCOL_V1), []).append(f"{run['domain']}:{run['seed']}")
    for protocol, names in protocols.items():
        lines.append(f"Selection protocol {protocol}: {', '.join(names)}.")
    if payload.get("missing"):
        lines.append(f"Not run yet (part of this preset): {', '.join(payload['missing'])}.")
    lines.append("")
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = payload["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.8), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        names = list(run["results"])
        ax.barh(names, [run["results"][m]["ratio_to_untouched"] for m in names], color="#4c72b0")
        ax.axvline(1.0, color="grey", linestyle="--")
        ax.set_xlabel("test perplexity / untouched (pulled by repo id)")
        ax.set_title(f"{run['domain']}, seed {run['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PROTOCOL_V1 = (
    "v1: each in-situ selection run built its own prefix cache inside its 20 s, so the tail slot (27 cached layers) "
    "had no time left to train and could not be chosen"
)
# v2 (no run on record is still on it): the in-situ selection runs of a slot share one prefix cache, its build not
# counted in their 20 s.
PROTOCOL = (
    "v3: v2 with four in-situ slots to choose from on validation (3 layers at 10-12 and 27-29, 6 layers at 10-15 and "
    "24-29)"
)


def run_file(name: str, domain: str, seed: int) -> Path:
    return RESULTS / "gain_runs" / f"{name}-{domain}-{seed}.json"


def on_record(name: str, preset: dict) -> list[dict]:
    """The preset's runs written so far, in the preset's order."""
    runs = []
    for domain in preset["domains"]:
        for seed in preset["seeds"][domain]:
            path = run_file(name, domain, seed)
            if path.is_file():
                runs.append(json.loads(path.read_text()))
    return runs


def parse_only(text: str, preset: dict) -> list[tuple[str, int]]:
    wanted = []
    for item in text.split(","):
        domain, _, seed = item.strip().partition(":")
        if domain not in preset["domains"] or not seed.isdigit() or int(seed) not in preset["seeds"][domain]:
            raise SystemExit(f"--only {item!r}: not a domain:seed of this preset ({preset['seeds']})")
        wanted.append((domain, int(seed)))
    return wanted


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="smoke preset (default)")
    group.add_argument("--full", action="store_true", help="four domains, seeds 0-2 on code")
    group.add_argument("--preset", choices=list(PRESETS), help="a named preset")
    parser.add_argument("--only", default=None, help="run only these domain:seed pairs, e.g. legal:0,code:1")
    parser.add_argument(
        "--upgrade", action="store_true", help="bring the runs on record (or --only ones) up to the current protocol"
    )
    parser.add_argument("--report", action="store_true", help="run nothing: rebuild the JSON, table, plot from record")
    parser.add_argument("--save-organs", default=None, help="also save every trained organ artifact into this folder")
    args = parser.parse_args()
    global SAVE_DIR
    SAVE_DIR = Path(args.save_organs) if args.save_organs else None
    name = args.preset or ("full" if args.full else "quick")
    preset = PRESETS[name]
    todo = (
        parse_only(args.only, preset)
        if args.only
        else [(d, seed) for d in preset["domains"] for seed in preset["seeds"][d]]
    )
    if args.report:
        todo = []
    recipient, tok = load_smollm2() if todo else (None, None)
    try:
        for domain, seed in todo:
            path = run_file(name, domain, seed)
            if args.upgrade:
                if not path.is_file():
                    print(f"{domain}:{seed}: not on record, nothing to upgrade")
                    continue
                run = json.loads(path.read_text())
                if not needs_upgrade(run):
                    continue
                run = upgrade(run, preset, recipient, tok)
            else:
                started = time.time()
                run = run_one(domain, seed, preset, recipient, tok)
                run.update(protocol=PROTOCOL, machine=machine(), wall_clock_s=round(time.time() - started, 1))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(run, indent=2, default=str))
    finally:
        HUB.stop()
    runs = on_record(name, preset)
    expected = [f"{d}:{seed}" for d in preset["domains"] for seed in preset["seeds"][d]]
    payload = {
        "preset": name,
        "settings": preset,
        "machine": machine(),
        "runs": runs,
        "missing": [k for k in expected if k not in {f"{r['domain']}:{r['seed']}" for r in runs}],
        "command": f"benchmarks/gain.py --preset {name}"
        + (f" --only {args.only}" if args.only else "")
        + (" --upgrade" if args.upgrade else ""),
        "wall_clock_s": round(
            sum(r.get("wall_clock_s", 0.0) + sum(u["wall_clock_s"] for u in r.get("upgrades", [])) for r in runs), 1
        ),
    }
    write_json(f"gain_{name}", payload)
    plot(payload, RESULTS / f"gain_{name}.png")
    write_markdown(f"gain_{name}", report(payload))
    print(report(payload))


if __name__ == "__main__":
    main()
