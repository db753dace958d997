"""Grow, replace or LoRA? Growth organs against the replacing organ and LoRA, forgetting, and composition.

The protocol and budgets of `gain.py --preset code` (blocks of 256 tokens, 120 s of training per method at a constant
rate, learning rates chosen on validation with 20 s runs from a grid extended past its edge, artifacts pushed to a
local Hub-protocol server and pulled by repo id in a fresh process into a fresh SmolLM2-135M), except that every
method trains on the domain's whole training split, seen once (never a small set repeated), on code and legal text:

- `growth3`: one growth organ of 3 identity layers inserted before layer 10 (copies of layers 7-9, output
  projections zeroed: `not_hub.grow_organ`), trained in situ; the recipient's 30 layers stay as they were;
- `growth_set`: one new identity layer after every sixth layer (5 layers, LLaMA-Pro's interleaving), trained jointly
  (`recover(model, transplants, radius=0)`), published as one `OrganSet` repo;
- `in_situ`: the replacing organ (layers 10-12 trained in situ at their slot; gain.py's method);
- `lora_all`: peft LoRA r=8 on every linear layer (gain.py's best LoRA).

Each is scored on the domain's test documents and on general text (WikiText-2 test: what it forgets).

Composition: a code organ and a legal organ trained by two different runs (growth organs at different depths: code
before layer 10, legal before layer 20), pulled by repo id and grafted together into one fresh recipient at the
positions their configs name, scored on both domains; beside each organ alone, and beside peft's own way of combining
the two domains' LoRA adapters (`add_weighted_adapter`, combination types cat, linear and svd, weights 1 and 1).

    python benchmarks/growth.py --quick   # smoke: seconds per method
    python benchmarks/growth.py --full    # code and legal (about 40 minutes; the machine to itself)

Each finished step is written at once to results/growth_runs/<preset>/<key>.json; a rerun skips what is on record.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gain  # noqa: F401  (starts the local Hub and points huggingface_hub at it before anything imports it)
from common import RESULTS, load_smollm2, machine, preset_parser, recorded, run_fresh, write_json, write_markdown
from gain import HUB, HUB_ENV, artifact_parameters, prepare, score_in_process, train_method
from quality import held_out, ppl

import not_hub
from not_hub.training import recover, train_organ

HERE = Path(__file__).resolve().parent
RUNS = RESULTS / "growth_runs"
GROWTH_AT = {"code": 10, "legal": 20}  # where each domain's block of 3 is grown (different depths: they compose)
SET_EVERY = 6
GRIDS = {
    "growth3": [3e-4, 1e-3, 3e-3],
    "growth_set": [3e-4, 1e-3, 3e-3],
    "in_situ_middle": [3e-4, 1e-3, 3e-3],
    "lora_all": [1e-3, 3e-3, 1e-2],
}
# gain.py's budgets, but the whole training split seen once (this round's rule: never a small set repeated).
PRESETS = {
    "quick": {**gain.PRESETS["quick"], "domains": ["code", "legal"], "general_docs": 6, "epochs": 1},
    "full": {
        **gain.PRESETS["code"],
        "domains": ["code", "legal"],
        "general_docs": 48,
        "train_blocks": 10**9,
        "epochs": 1,
    },
}
COMBINATIONS = ["cat", "linear", "svd"]


def train(method: str, domain: str, recipient, data, preset: dict, lr: float, seconds: float):
    """(artifact, info): growth organs here, the replacing organ and LoRA through gain.py's `train_method`."""
    args = gain.args_for(preset, 0, lr, seconds)
    if method == "growth3":
        organ = not_hub.grow_organ(recipient, GROWTH_AT[domain], num_layers=3)
        m = train_organ(organ, recipient, data, method="in_situ", **args)
        cache_s = (organ.config.training.get("prefix_cache") or {}).get("build_s", 0.0)
        return organ, {"tokens_seen": m.tokens_seen, "train_s": m.wall_clock_s - m.validation_s + cache_s}
    if method == "growth_set":
        depth = recipient.config.num_hidden_layers
        grown = [not_hub.grow_organ(recipient, p) for p in range(SET_EVERY, depth + 1, SET_EVERY)]
        transplants = []
        try:
            for i, organ in enumerate(grown):  # each position counts the layers grafted before it
                position = organ.config.default_transplant["position"] + i
                transplants.append(organ.transplant_into(recipient, position=position))
            m = recover(recipient, transplants, data, radius=0, **args)
            artifact = not_hub.OrganSet.from_transplants(transplants)
        finally:
            for t in reversed(transplants):
                t.explant()
        return artifact, {"tokens_seen": m.tokens_seen, "train_s": m.wall_clock_s - m.validation_s}
    return train_method(method, recipient, data, preset, 0, lr, seconds)


def score(artifact, recipient, docs, tok) -> float:
    if isinstance(artifact, not_hub.OrganSet):
        transplants = artifact.transplant_into(recipient)
        try:
            return ppl(recipient, docs, tok)
        finally:
            for t in reversed(transplants):
                t.explant()
    return score_in_process(artifact, recipient, docs, tok)


PULL = """
import json, sys
sys.path.insert(0, {here!r})
from common import load_smollm2
from quality import ppl
import not_hub
spec, docs = json.loads(sys.argv[1]), json.load(open(sys.argv[2]))
model, tok = load_smollm2()  # a fresh recipient in a fresh process
out = {{}}
if spec["kind"] == "set":
    not_hub.OrganSet.from_pretrained(spec["repos"][0]).transplant_into(model)
elif spec["kind"] == "organ":  # its own default transplant
    not_hub.OrganModel.from_pretrained(spec["repos"][0]).transplant_into(model)
elif spec["kind"] == "lora":
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, spec["repos"][0])
elif spec["kind"] == "organs":  # grafted at the positions their configs name, the deepest first
    organs = [not_hub.OrganModel.from_pretrained(r) for r in spec["repos"]]
    for organ in sorted(organs, key=lambda o: -o.config.default_transplant["position"]):
        organ.transplant_into(model)
    out["layers"] = model.config.num_hidden_layers
else:  # two LoRA adapters combined by peft, each combination type in turn
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, spec["repos"][0], adapter_name="a")
    model.load_adapter(spec["repos"][1], adapter_name="b")
    for combination in spec["combinations"]:
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], combination, combination_type=combination)
        model.set_adapter(combination)
        out[combination] = {{name: ppl(model, texts, tok) for name, texts in docs.items()}}
    print(json.dumps(out))
    sys.exit(0)
for name, texts in docs.items():
    out[name] = ppl(model, texts, tok)
print(json.dumps(out))
"""


def pull(spec: dict, docs: dict[str, list[str]]) -> dict:
    return run_fresh(PULL.format(here=str(HERE)), [json.dumps(spec)], docs, HUB_ENV, f"pulling {spec}")


def restore(repo_id: str) -> None:
    """A repo pushed by an earlier process of this benchmark (each process runs its own Hub server) is put back on
    this one from the Hub cache of the process that pulled it, byte for byte as it was downloaded."""
    if repo_id in HUB.state.repos:
        return
    name = "models--" + repo_id.replace("/", "--")
    snapshots = sorted(
        Path(tempfile.gettempdir()).glob(f"not_hub-gain-*/hub/{name}/snapshots/*"), key=lambda p: p.stat().st_mtime
    )
    if not snapshots:
        raise SystemExit(f"{repo_id} is on record but its artifact is gone: rerun its final (delete its JSON)")
    folder = snapshots[-1]
    HUB.seed(repo_id, folder)
    print(f"{repo_id}: restored from {folder}", flush=True)


class Run:
    def __init__(self, name: str, preset: dict, recipient, tok):
        self.name, self.preset, self.recipient, self.tok = name, preset, recipient, tok
        self.folder = RUNS / name
        self._data = {}

    def data(self, domain: str):
        if domain not in self._data:
            data, val, test = prepare(domain, 0, self.preset, self.tok)
            from domains import DOMAINS

            general = held_out(DOMAINS["general"]().test, self.preset["general_docs"], self.preset["eval_chars"])
            self._data[domain] = (data, val, test, general)
        return self._data[domain]

    def step(self, key: str, run) -> dict:
        out, fresh = recorded(self.folder / f"{key}.json", run)
        if fresh:
            print(f"{key}: {json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)})[:300]}", flush=True)
        return out

    def untouched(self, domain: str) -> dict:
        def run():
            _, val, test, general = self.data(domain)
            r = self.recipient
            return {
                "validation": ppl(r, val, self.tok),
                "test": ppl(r, test, self.tok),
                "general": ppl(r, general, self.tok),
            }

        return self.step(f"{domain}-untouched", run)

    def select(self, domain: str, method: str) -> dict:
        def run():
            data, val, _, _ = self.data(domain)
            grid = GRIDS[method] if self.preset["select_s"] >= 10 else GRIDS[method][1:2]
            tried = {}
            queue = list(grid)
            while queue:
                lr = queue.pop(0)
                artifact, _ = train(method, domain, self.recipient, data, self.preset, lr, self.preset["select_s"])
                tried[lr] = score(artifact, self.recipient, val, self.tok)
                best, ordered = min(tried, key=tried.get), sorted(tried)
                if not queue and len(tried) > 1 and best in (ordered[0], ordered[-1]) and len(tried) < len(grid) + 2:
                    queue.append(best / 3 if best == ordered[0] else best * 3)
            best, ordered = min(tried, key=tried.get), sorted(tried)
            return {
                "validation_ppl": {f"{k:g}": v for k, v in sorted(tried.items())},
                "chosen_lr": best,
                "at_grid_edge": len(tried) > 1 and best in (ordered[0], ordered[-1]),
            }

        return self.step(f"{domain}-select-{method}", run)

    def final(self, domain: str, method: str) -> dict:
        def run():
            data, _, test, general = self.data(domain)
            lr = self.select(domain, method)["chosen_lr"]
            artifact, info = train(method, domain, self.recipient, data, self.preset, lr, self.preset["budget_s"])
            repo_id = f"bench/growth-{self.name}-{domain}-{method.replace('_', '-')}"
            row = {"lr": lr, **info}
            artifact.push_to_hub(repo_id)
            if isinstance(artifact, not_hub.OrganSet):
                kind = "set"
                row["artifact_parameters"] = sum(p.numel() for o in artifact.organs for p in o.parameters())
            else:
                kind = "organ" if isinstance(artifact, not_hub.OrganModel) else "lora"
                row["artifact_parameters"] = artifact_parameters(artifact)
            scores = pull({"kind": kind, "repos": [repo_id]}, {"test": test, "general": general})
            row.update(test_ppl=scores["test"], general_ppl=scores["general"], repo_id=repo_id)
            row["scored"] = f"pulled by repo id {repo_id} in a fresh process into a fresh recipient"
            return row

        return self.step(f"{domain}-final-{method}", run)

    def composition(self) -> dict:
        def run():
            docs = {d: self.data(d)[2] for d in ("code", "legal")}
            organs = [f"bench/growth-{self.name}-{d}-growth3" for d in ("code", "legal")]
            loras = [f"bench/growth-{self.name}-{d}-lora-all" for d in ("code", "legal")]
            for repo_id in organs + loras:
                restore(repo_id)
            out = {"organs_together": pull({"kind": "organs", "repos": organs}, docs)}
            mixed = pull({"kind": "lora_mix", "repos": loras, "combinations": COMBINATIONS}, docs)
            for combination in COMBINATIONS:
                out[f"lora_{combination}"] = mixed[combination]
            return out

        return self.step("composition", run)


METHODS = ["growth3", "growth_set", "in_situ_middle", "lora_all"]
LABELS = {
    "growth3": "growth organ, 3 layers inserted (30 original layers frozen)",
    "growth_set": "growth set, 1 layer after every 6th (5 layers, trained jointly)",
    "in_situ_middle": "replacing organ, layers 10-12 in situ",
    "lora_all": "LoRA r=8, every linear layer",
}


def report(payload: dict) -> str:
    p = payload["settings"]
    lines = [
        f"### Grow, replace or LoRA ({payload['preset']} preset: the whole training split in blocks of {p['block']} "
        f"tokens, seen once; {p['budget_s']} s of training per method, learning rates chosen on validation with {p['select_s']} s runs; "
        "artifacts pulled by repo id into a fresh recipient)",
        "",
        "| domain | method | lr | test ppl | / untouched | / LoRA | general ppl | / untouched | tokens seen | "
        "artifact params |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for domain, d in payload["domains"].items():
        u = d["untouched"]
        lines.append(f"| {domain} | untouched | | {u['test']:.3f} | 1.000 | | {u['general']:.3f} | 1.000 | | |")
        lora = d["finals"].get("lora_all", {}).get("test_ppl")
        for method, r in d["finals"].items():
            lines.append(
                f"| {domain} | {LABELS[method]} | {r['lr']:g} | {r['test_ppl']:.3f} | {r['test_ppl'] / u['test']:.3f} "
                f"| {r['test_ppl'] / lora:.3f} | {r['general_ppl']:.3f} | {r['general_ppl'] / u['general']:.3f} | "
                f"{r['tokens_seen']:,} | {r['artifact_parameters']:,} |"
                if lora
                else f"| {domain} | {LABELS[method]} | {r['lr']:g} | {r['test_ppl']:.3f} | | | {r['general_ppl']:.3f} | | | |"
            )
    comp = payload.get("composition")
    if comp:
        doms = payload["domains"]
        lines += [
            "",
            "#### Composition: the code and the legal artifact together in one recipient (test perplexity)",
            "",
            "| combination | code test | legal test |",
            "|---|---|---|",
            f"| untouched | {doms['code']['untouched']['test']:.3f} | {doms['legal']['untouched']['test']:.3f} |",
            f"| code growth organ alone | {doms['code']['finals']['growth3']['test_ppl']:.3f} | |",
            f"| legal growth organ alone | | {doms['legal']['finals']['growth3']['test_ppl']:.3f} |",
            f"| both growth organs (code before layer 10, legal before layer 20; "
            f"{comp['organs_together'].get('layers', '')} layers) | {comp['organs_together']['code']:.3f} | "
            f"{comp['organs_together']['legal']:.3f} |",
            f"| code LoRA alone | {doms['code']['finals']['lora_all']['test_ppl']:.3f} | |",
            f"| legal LoRA alone | | {doms['legal']['finals']['lora_all']['test_ppl']:.3f} |",
        ]
        for combination in COMBINATIONS:
            c = comp[f"lora_{combination}"]
            lines.append(
                f"| both LoRAs, peft add_weighted_adapter({combination}, weights 1, 1) | {c['code']:.3f} | "
                f"{c['legal']:.3f} |"
            )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = preset_parser(__doc__)
    parser.add_argument("--report", action="store_true", help="run nothing: rebuild the JSON and table from record")
    args = parser.parse_args()
    name = "full" if args.full else "quick"
    preset = PRESETS[name]
    run = Run(name, preset, *((load_smollm2()) if not args.report else (None, None)))
    try:
        if not args.report:
            for domain in preset["domains"]:
                run.untouched(domain)
                for method in METHODS:
                    run.select(domain, method)
                    run.final(domain, method)
            run.composition()
    finally:
        HUB.stop()
    domains = {}
    for domain in preset["domains"]:
        path = RUNS / name / f"{domain}-untouched.json"
        if path.is_file():
            finals = {
                m: json.loads((RUNS / name / f"{domain}-final-{m}.json").read_text())
                for m in METHODS
                if (RUNS / name / f"{domain}-final-{m}.json").is_file()
            }
            domains[domain] = {"untouched": json.loads(path.read_text()), "finals": finals}
    comp = RUNS / name / "composition.json"
    payload = {
        "preset": name,
        "settings": preset,
        "machine": machine(),
        "domains": domains,
        "composition": json.loads(comp.read_text()) if comp.is_file() else None,
        "command": f"benchmarks/growth.py --{name}",
    }
    write_json(f"growth_{name}", payload)
    write_markdown(f"growth_{name}", report(payload))
    print(report(payload))


if __name__ == "__main__":
    main()
