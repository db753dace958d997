"""One protocol for every number the README and docs quote: learning curves on whole corpora seen once, with
forgetting and noise. Every method is an entry of one registry (`REGISTRY`), run by one harness.

For each domain (code: CodeXGLUE Java/C#; legal: CUAD contracts; biomedical: PubMedQA abstracts) every method trains
on the domain's *whole* training split, one pass, blocks never repeated, for up to `budget_s` of training time
(validation excluded), and its validation perplexity is recorded along the way (at `marks`: 0.5, 1, 2, 3, 5, 7.5, 10,
15 and 20 minutes), with the tokens seen at each point. Every run uses a constant learning rate (no warmup, no decay),
so each point of a curve is what stopping there would give, and a 2-minute run is the first two minutes of a
20-minute one.

The registry (choices on validation at the 2-minute budget `select_s`, seed 0):
- `organ`, the replacing organ: its slot and width among layers 10-12, 27-29 (3 layers) and 10-15, 24-29 (6 layers),
  trained in situ at the default rate 1e-3;
- `growth_set`: new identity layers (`not_hub.grow_organ`), one after every 10th, 6th or 3rd layer (3, 5 or 10
  layers), chosen at 1e-3, trained jointly (`recover(radius=0)`), published as one `OrganSet`;
- `growth_block`: one block of 3 identity layers grown before layer 10, trained in situ;
- `lora_r8`, `lora_r64`: peft LoRA on every linear layer, alpha = 2r; `full_ft`: full fine-tuning.
Then the chosen variant's learning rate from its grid (a choice at the grid's edge extends the grid past it, twice at
most), then the batch size: 8 at the chosen rate against the 4 the rate was chosen at (8 replaces 4 only when it is
better by more than the half-range of the seeds on record at 4).

Then, per method at its chosen rate:
- the 20-minute run (seed 0): the curve; its artifact pushed to a local Hub-protocol server, pulled by repo id in a
  fresh process into a fresh SmolLM2-135M and scored on the domain's test documents and on general text (WikiText-2
  test: forgetting), beside the untouched model;
- the 2-minute point with seeds 1 and 2 (seed 0 is the selection run): mean and spread of validation perplexity,
  and of general perplexity (forgetting at 2 minutes).

    python benchmarks/curves.py --quick              # smoke: seconds per method, a few blocks
    python benchmarks/curves.py --full               # the whole thing (many hours: the machine to itself)
    python benchmarks/curves.py --full --only code   # one domain
    python benchmarks/curves.py --full --methods growth_set,growth_block --stage short  # entries, 2-min cells only
    python benchmarks/curves.py --full --report      # rebuild JSON, table and plots from the cells on record

Every cell (one training run and its scores) is written at once to results/curves_runs/<preset>/<domain>/<cell>.json,
and the preset's JSON, table and plots are rebuilt from every cell on record: a killed run loses only the cell in
progress, and a rerun carries on from there. While the file $NOT_HUB_BENCH_PAUSE (default
/tmp/not_hub-bench.pause) exists, the run waits before its next cell: touch it to use the machine for something
else without a second job skewing a cell's wall-clock budget.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "fixtures"))
from common import recorded, run_fresh  # noqa: E402
from hub_server import LocalHub  # noqa: E402

os.environ.setdefault(
    "NOT_HUB_CACHE", str(Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "not_hub")
)
HUB = None
HUB_ENV: dict[str, str] = {}


def start_hub() -> None:
    """A local Hub-protocol server for the artifacts (huggingface_hub reads its endpoint at import: call first)."""
    global HUB
    HUB = LocalHub().start()
    HUB_ENV.update(
        HF_ENDPOINT=HUB.endpoint,
        HF_HOME=tempfile.mkdtemp(prefix="not_hub-curves-"),
        HF_TOKEN="bench",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    os.environ.update(HUB_ENV)


MINUTE = 60.0
SLOTS = {"organ_middle3": (10, 13), "organ_tail3": (27, 30), "organ_middle6": (10, 16), "organ_tail6": (24, 30)}
LORA_RANKS = {"lora_r8": 8, "lora_r64": 64}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GRIDS = {
    "organ": [3e-4, 1e-3, 3e-3],
    "lora_r8": [3e-3, 1e-2, 3e-2],
    "lora_r64": [1e-3, 3e-3, 1e-2],
    "full_ft": [1e-4, 3e-4, 1e-3],
}
SLOT_LR = 1e-3  # the in-situ default (not_hub.DEFAULT_LR): the rate at which the slot and width are chosen
# Growth sets: one identity layer after every `n`-th layer of the 30 (LLaMA-Pro's interleaving), trained jointly.
GROWTH_SETS = {"growth_set_every10": 10, "growth_set_every6": 6, "growth_set_every3": 3}
GROWTH_BLOCKS = {"growth_block3": (10, 3)}  # one block of 3 identity layers grown before layer 10
GRIDS.update(growth_set=[3e-4, 1e-3, 3e-3], growth_block=[3e-4, 1e-3, 3e-3])
BATCHES = (4, 8)  # the batch size is part of each method's 2-minute selection (8: tried at the chosen rate)


@dataclass(frozen=True)
class Method:
    """One entry of the registry: its variants (structures chosen among on validation at `structure_lr`, seed 0,
    batch 4), then the chosen variant's learning rate from `grid`, then the batch size."""

    variants: tuple[str, ...]
    grid: str
    structure_lr: float = SLOT_LR


REGISTRY = {
    "organ": Method(tuple(SLOTS), "organ"),
    "growth_set": Method(tuple(GROWTH_SETS), "growth_set"),
    "growth_block": Method(tuple(GROWTH_BLOCKS), "growth_block"),
    "lora_r8": Method(("lora_r8",), "lora_r8"),
    "lora_r64": Method(("lora_r64",), "lora_r64"),
    "full_ft": Method(("full_ft",), "full_ft"),
}
METHODS = list(REGISTRY)
PROTOCOL_CHECKS = ["full_ft", "lora_r64"]  # full fine-tuning's code test figure (6.70 against 3.44 on validation)


class Missing(Exception):
    """A cell the report needs is not on record (the report never runs one)."""


PRESETS = {
    "quick": dict(
        domains=["code"], budget_s=8, select_s=4, marks=[2, 4, 8], seeds=[0, 1], max_train_blocks=64,
        validation_blocks=4, test_docs=6, general_docs=4, eval_chars=600, batch_size=4, block=128, grid_points=1,
    ),
    "full": dict(
        domains=["code", "legal", "biomedical"], budget_s=1200, select_s=120, marks=[30, 60, 120, 180, 300, 450, 600, 900, 1200],
        seeds=[0, 1, 2], max_train_blocks=None, validation_blocks=24, test_docs=120, general_docs=24,
        eval_chars=1500, batch_size=4, block=256, grid_points=3,
    ),
}  # fmt: skip
RUNS = HERE / "results" / "curves_runs"
# While this file exists the benchmark waits before its next cell (touch it to run something else between cells).
PAUSE = Path(os.environ.get("NOT_HUB_BENCH_PAUSE", Path(tempfile.gettempdir()) / "not_hub-bench.pause"))


# ------------------------------------------------------------------------------------------------------ the data


def prepare(domain: str, preset: dict, tok):
    """The whole training split packed once (seed 0's document order; the Trainer's sampler shuffles per seed),
    validation blocks spread evenly over the validation split, test and general documents."""
    from domains import DOMAINS
    from quality import held_out

    from not_hub.data import BlockData, make_blocks

    splits = DOMAINS[domain]()
    blocks = make_blocks(splits, tok, preset["block"], seed=0)
    train = blocks.train
    if preset["max_train_blocks"] is not None:
        train = train.select(range(min(preset["max_train_blocks"], len(train))))
    val = blocks.validation
    step = max(1, len(val) // preset["validation_blocks"])
    val = val.select(range(0, step * preset["validation_blocks"], step)) if len(val) > step else val
    data = BlockData(
        train=train,
        validation=val,
        description={"domain": domain, "train_blocks": len(train), "block_size": preset["block"]},
    )
    general = DOMAINS["general"]().test
    return (
        data,
        held_out(splits.test, preset["test_docs"], preset["eval_chars"]),
        held_out(general, preset["general_docs"], preset["eval_chars"]),
    )


# ------------------------------------------------------------------------------------------- one method, one run


def windowed(preset: dict):
    """A measure scoring each document on its own, in windows no longer than the training blocks (stride half a
    block): every token predicted at a position the training saw. Beside the per-document figure (windows of 512)
    it tells an effect of positions past the block length from an effect of the text."""
    from not_hub import perplexity

    def measure(model, docs, tok) -> float:
        return perplexity(model, docs, tokenizer=tok, max_length=preset["block"]).perplexity

    return measure


def train(
    method: str, lr: float, seed: int, seconds: float | None, recipient, data, preset: dict, batch: int | None = None,
    precision: str = "no", steps: int | None = None,
):  # fmt: skip
    """Train `method` (a variant: a slot, a growth set or block, a LoRA, full_ft) for `seconds` (or `steps`) at batch
    size `batch` (default the preset's), in float32 (`precision` "bf16": the bf16-autocast check only); return
    (artifact, record). The recipient is left untouched."""
    import torch

    import not_hub
    from not_hub.training import OrganTrainingArguments, fit_parameters, train_organ

    marks = [m for m in preset["marks"] if seconds is not None and m < seconds]
    args = dict(
        epochs=1, lr=lr, warmup_ratio=0.0, batch_size=batch or preset["batch_size"], seed=seed, progress=False,
        max_seconds=seconds, max_steps=steps, eval_every=10**9, eval_at_seconds=marks or None,
        trainer_args={"lr_scheduler_type": "constant"},
        mixed_precision=precision,  # float32 ("no") for every figure reported: the cells stay comparable
    )  # fmt: skip
    torch.manual_seed(seed)
    params = None
    if method in SLOTS:
        artifact = not_hub.extract_organ(recipient, layer_range=SLOTS[method])
        metrics = train_organ(artifact, recipient, data, method="in_situ", **args)
    elif method in GROWTH_BLOCKS:
        position, layers = GROWTH_BLOCKS[method]
        artifact = not_hub.grow_organ(recipient, position, num_layers=layers)
        metrics = train_organ(artifact, recipient, data, method="in_situ", **args)
    elif method in GROWTH_SETS:
        from not_hub.training import recover

        every = GROWTH_SETS[method]
        depth = recipient.config.num_hidden_layers
        grown = [not_hub.grow_organ(recipient, p) for p in range(every, depth + 1, every)]
        transplants = []
        try:
            for i, organ in enumerate(grown):  # each position counts the layers grafted before it
                transplants.append(
                    organ.transplant_into(recipient, position=organ.config.default_transplant["position"] + i)
                )
            metrics = recover(recipient, transplants, data, radius=0, **args)
            artifact = not_hub.OrganSet.from_transplants(transplants)
        finally:
            for t in reversed(transplants):
                t.explant()
        params = [p for organ in artifact.organs for p in organ.parameters()]
    else:
        model = copy.deepcopy(recipient)
        if method in LORA_RANKS:
            from peft import LoraConfig, get_peft_model

            r = LORA_RANKS[method]
            model = get_peft_model(
                model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS)
            )
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            params = list(model.parameters())
        metrics = fit_parameters(model, params, data, OrganTrainingArguments(**args), method)
        artifact = model.eval()
    train_tokens = len(data.train) * data.block_size
    record = {
        "method": method,
        "lr": lr,
        "seed": seed,
        "budget_s": seconds,
        "train_s": round(metrics.wall_clock_s - metrics.validation_s, 1),
        "validation_s": metrics.validation_s,
        "steps": metrics.steps,
        "tokens_seen": metrics.tokens_seen,
        "passes_over_train_split": metrics.tokens_seen / train_tokens,
        "curve": [
            {
                "minutes": h["training_s"] / MINUTE,
                "tokens": h["tokens_seen"],
                "validation_ppl": math.exp(h["validation_loss"]),
            }
            for h in metrics.history
        ],
        "best_validation_ppl": math.exp(metrics.best_validation_loss),
        "batch_size": args["batch_size"],
        "mixed_precision": metrics.mixed_precision,
        "cpu": _cpu(),  # (cells before 2026-12-08 did not record it)
        "trainable_parameters": sum(p.numel() for p in (artifact.parameters() if params is None else params)),
    }
    return artifact, record


def _cpu() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return ""


def score(artifact, recipient, docs, tok, measure=None) -> float:
    """`measure(model, docs, tok)` (per-document perplexity by default) of the artifact, in this process."""
    from quality import ppl

    import not_hub

    measure = measure or ppl
    if isinstance(artifact, not_hub.OrganSet):
        transplants = artifact.transplant_into(recipient)
        try:
            return measure(recipient, docs, tok)
        finally:
            for t in reversed(transplants):
                t.explant()
    if isinstance(artifact, not_hub.OrganModel):
        with artifact.transplanted(recipient):
            return measure(recipient, docs, tok)
    return measure(artifact, docs, tok)


def packed(preset: dict):
    """A measure scoring documents as validation scores them: joined (EOS after each) into `block`-token blocks,
    each token predicted mid-stream. Beside the per-document test figure it separates a change in the text from a
    change in the protocol (every document scored from its first token, with no context)."""
    from not_hub.data import pack_blocks
    from not_hub.training import validation_loss

    def measure(model, docs, tok) -> float:
        return math.exp(validation_loss(model, pack_blocks(docs, tok, preset["block"]), preset["batch_size"]))

    return measure


PULL_AND_SCORE = """
import json, sys
sys.path.insert(0, {here!r})
from common import load_smollm2
from quality import ppl
import not_hub
kind, repo_id, docs_path = sys.argv[1], sys.argv[2], sys.argv[3]
docs = json.load(open(docs_path))
model, tok = load_smollm2()  # a fresh recipient in a fresh process
if kind == "organ":
    not_hub.OrganModel.from_pretrained(repo_id).transplant_into(model)  # by repo id, its own default transplant
elif kind == "set":
    not_hub.OrganSet.from_pretrained(repo_id).transplant_into(model)  # every organ at its recorded place
elif kind == "lora":
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, repo_id)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(repo_id, dtype="float32")
print(json.dumps({{name: ppl(model, texts, tok) for name, texts in docs.items()}}))
"""


def push_pull_score(artifact, repo_id: str, docs: dict[str, list[str]]) -> dict[str, float]:
    """Push the artifact to the local Hub, pull it by repo id in a fresh process into a fresh recipient, score it."""
    from peft import PeftModel

    import not_hub

    kinds = ((not_hub.OrganModel, "organ"), (not_hub.OrganSet, "set"), (PeftModel, "lora"))
    kind = next((k for cls, k in kinds if isinstance(artifact, cls)), "full")
    artifact.push_to_hub(repo_id)
    return run_fresh(PULL_AND_SCORE.format(here=str(HERE)), [kind, repo_id], docs, HUB_ENV, f"pulling {repo_id}")


# ---------------------------------------------------------------------------------------------------- the cells


class Domain:
    """One domain's cells: each a JSON file, run once, read back on later runs."""

    def __init__(self, name: str, preset_name: str, preset: dict, recipient=None, tok=None, *, dry: bool = False):
        self.name, self.preset, self.recipient, self.tok = name, preset, recipient, tok
        self.folder = RUNS / preset_name / name
        self._data = None
        self.dry = dry  # read cells on record only (the report): a missing one raises `Missing`

    @property
    def data(self):
        if self._data is None:
            self._data = prepare(self.name, self.preset, self.tok)
        return self._data

    def cell(self, key: str, run) -> dict:
        path = self.folder / f"{key}.json"
        if self.dry:
            if not path.is_file():
                raise Missing(key)
            return json.loads(path.read_text())
        if not path.is_file() and PAUSE.exists():  # (before the cell's clock starts: a pause is not its time)
            print(f"[{self.name}] paused before {key} until {PAUSE} is removed", flush=True)
            while PAUSE.exists():  # the machine is lent to something else between cells (the next cell waits)
                time.sleep(5)
        out, fresh = recorded(path, run, "cell_wall_clock_s")
        if fresh:
            print(f"[{self.name}] {key}: {summary(out)}", flush=True)
        return out

    def untouched(self) -> dict:
        from quality import ppl

        from not_hub.training import validation_loss

        def run():
            data, test, general = self.data
            return {
                "validation_ppl": math.exp(
                    validation_loss(self.recipient, data.validation, self.preset["batch_size"])
                ),
                "test_ppl": ppl(self.recipient, test, self.tok),
                "general_ppl": ppl(self.recipient, general, self.tok),
                "train_blocks": len(data.train),
                "train_tokens": len(data.train) * data.block_size,
                "validation_blocks": len(data.validation),
                "test_docs": len(test),
                "general_docs": len(general),
            }

        return self.cell("untouched", run)

    def untouched_packed(self) -> dict:
        """The untouched model's test documents scored packed, as validation is (see `packed`)."""

        def run():
            _, test, _ = self.data
            return {"test_packed_ppl": score(self.recipient, self.recipient, test, self.tok, packed(self.preset))}

        return self.cell("untouched-packed", run)

    def untouched_window(self) -> dict:
        """The untouched model's test documents scored in windows of one block (see `windowed`)."""

        def run():
            _, test, _ = self.data
            return {"test_window_ppl": score(self.recipient, self.recipient, test, self.tok, windowed(self.preset))}

        return self.cell("untouched-window", run)

    def short(self, method: str, lr: float, seed: int, batch: int | None = None) -> dict:
        """A run of `select_s` (the 2-minute point), scored on general text in-process (forgetting at 2 minutes)."""
        batch = batch or self.preset["batch_size"]

        def run():
            data, _, general = self.data
            artifact, record = train(
                method, lr, seed, self.preset["select_s"], self.recipient, data, self.preset, batch
            )
            record["general_ppl"] = score(artifact, self.recipient, general, self.tok)
            return record

        # (cells of the preset's batch size keep the keys they were first recorded under)
        suffix = "" if batch == self.preset["batch_size"] else f"-b{batch}"
        return self.cell(f"short-{method}-lr{lr:g}{suffix}-seed{seed}", run)

    def choose(self, name: str) -> dict:
        """The registry entry's choices on validation at `select_s`, seed 0: variant, learning rate, batch size."""
        entry = REGISTRY[name]
        base = self.preset["batch_size"]
        out: dict = {"name": name}
        if len(entry.variants) > 1:
            tried = {v: self.short(v, entry.structure_lr, 0)["best_validation_ppl"] for v in entry.variants}
            out["variant_validation_ppl"] = tried
            out["structure_lr"] = entry.structure_lr
        variant = (
            min(out["variant_validation_ppl"], key=out["variant_validation_ppl"].get)
            if len(entry.variants) > 1
            else entry.variants[0]
        )
        lr, info = self.choose_lr(variant, entry.grid)
        out.update(info, method=variant)
        batches = {base: info["validation_ppl"][f"{lr:g}"]}
        others = [b for b in BATCHES if b != base]
        try:
            batches.update({b: self.short(variant, lr, 0, b)["best_validation_ppl"] for b in others})
        except Missing:  # the report: a selection recorded before batch sizes were part of it
            out["batch_selection"] = f"batch {', '.join(map(str, others))} not run yet"
        out["batch_validation_ppl"] = {str(b): v for b, v in batches.items()}
        # Another batch size replaces the base one only if it is better by more than the base's seed spread (when
        # seeds are on record): a difference inside the noise does not discard the cells recorded at the base size.
        seeds = [
            c["best_validation_ppl"]
            for c in (self._recorded_short(variant, lr, seed, base) for seed in self.preset["seeds"])
            if c is not None
        ]
        margin = (max(seeds) - min(seeds)) / 2 if len(seeds) > 1 else 0.0
        best = min(batches, key=batches.get)
        out["batch_size"] = best if batches[best] < batches[base] - margin else base
        out["batch_margin"] = margin
        return out

    def _recorded_short(self, method: str, lr: float, seed: int, batch: int) -> dict | None:
        suffix = "" if batch == self.preset["batch_size"] else f"-b{batch}"
        path = self.folder / f"short-{method}-lr{lr:g}{suffix}-seed{seed}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def choose_lr(self, method: str, grid_name: str) -> tuple[float, dict]:
        grid = GRIDS[grid_name]
        if self.preset["grid_points"] == 1:
            grid = [grid[len(grid) // 2]]
        tried = {lr: self.short(method, lr, 0)["best_validation_ppl"] for lr in grid}
        for _ in range(2):  # a choice at the grid's edge extends the grid one step past it, twice at most
            best, ordered = min(tried, key=tried.get), sorted(tried)
            if len(tried) < 2 or best not in (ordered[0], ordered[-1]):
                break
            lr = float(f"{best / 3 if best == ordered[0] else best * 3:.3g}")
            tried[lr] = self.short(method, lr, 0)["best_validation_ppl"]
        best, ordered = min(tried, key=tried.get), sorted(tried)
        return best, {
            "validation_ppl": {f"{k:g}": v for k, v in sorted(tried.items())},
            "chosen_lr": best,
            "at_grid_edge": len(tried) > 1 and best in (ordered[0], ordered[-1]),
        }

    def final(self, name: str, choice: dict) -> dict:
        batch = choice["batch_size"]

        def run():
            data, test, general = self.data
            method, lr = choice["method"], choice["chosen_lr"]
            artifact, record = train(method, lr, 0, self.preset["budget_s"], self.recipient, data, self.preset, batch)
            # In this process, before the round trip: the pulled figure must match the first; the packed one
            # tells a protocol effect from a text effect (see `packed`).
            record.update(self.test_scores(artifact, test))
            repo_id = f"bench/curves-{self.name}-{name.replace('_', '-')}"
            record.update(push_pull_score(artifact, repo_id, {"test_ppl": test, "general_ppl": general}))
            record["scored"] = f"pulled by repo id {repo_id} in a fresh process into a fresh recipient"
            return record

        suffix = "" if batch == self.preset["batch_size"] else f"-b{batch}"
        return self.cell(f"final-{name}{suffix}", run)

    def run_all(self, methods: list[str] | None = None, stage: str = "all") -> None:
        """Every cell of `methods` (default: the whole registry): selection, then the seeds and protocol checks
        (stage "short" stops there), then the 20-minute runs."""
        methods = methods or METHODS
        self.untouched()
        self.untouched_packed()
        self.untouched_window()
        chosen = {name: self.choose(name) for name in methods}
        # The short cells first (the seeds, then the checks), the 20-minute runs last: a domain stopped part-way
        # has its whole 2-minute picture.
        for name in methods:
            for seed in self.preset["seeds"][1:]:
                self.short(chosen[name]["method"], chosen[name]["chosen_lr"], seed, chosen[name]["batch_size"])
        for name in PROTOCOL_CHECKS:
            if name in chosen:
                self.protocol_check(name, chosen[name])
        if stage == "short":
            return
        for name in methods:
            self.final(name, chosen[name])

    def bf16_check(self, names=("organ", "lora_r8")) -> dict:
        """Each method's seed-0 selection run again in bf16 autocast: at equal wall-clock (`select_s`) and at the
        float32 run's number of steps, beside the float32 run (validation is scored during training, under the
        run's own autocast; general text afterwards in float32)."""
        out = {}
        for name in names:
            choice = self.choose(name)
            method, lr, batch = choice["method"], choice["chosen_lr"], choice["batch_size"]
            fp32 = self.short(method, lr, 0, batch)
            # The float32 reference from this machine when there is one (`machine_check`): a wall-clock comparison
            # across machines would measure the machines.
            today = sorted(self.folder.glob(f"machinecheck-{method}-lr{lr:g}-seed0-*.json"))
            if today and batch == self.preset["batch_size"]:
                fp32 = json.loads(today[-1].read_text())
            suffix = "" if batch == self.preset["batch_size"] else f"-b{batch}"

            def run(seconds, steps, method=method, lr=lr, batch=batch):
                data, _, general = self.data
                artifact, record = train(
                    method, lr, 0, seconds, self.recipient, data, self.preset, batch, precision="bf16", steps=steps
                )
                record["general_ppl"] = score(artifact, self.recipient, general, self.tok)
                return record

            wall = self.cell(f"bf16-{method}-lr{lr:g}{suffix}-seed0", lambda: run(self.preset["select_s"], None))
            steps = self.cell(
                f"bf16-{method}-lr{lr:g}{suffix}-seed0-steps{fp32['steps']}", lambda n=fp32["steps"]: run(None, n)
            )
            out[name] = {"float32": fp32, "bf16_equal_wall_clock": wall, "bf16_equal_steps": steps}
        return out

    def machine_check(self, names=("organ", "lora_r8")) -> dict:
        """The seed-0 selection cells of `names` run again today, on this machine: cells carry no record of the CPU
        that ran them, and a wall-clock budget depends on it. Tokens seen and validation beside the cell on record
        tell whether cells of different sessions can be compared at equal wall-clock."""
        import datetime
        import platform

        cpu = _cpu()
        tag = f"{datetime.date.today():%Y%m%d}-{(cpu or platform.processor() or 'cpu').split()[0].lower()}"
        out = {}
        for name in names:
            entry = REGISTRY[name]  # the structure and rate on record, at the batch size the old cells used
            variant = entry.variants[0]
            if len(entry.variants) > 1:
                tried = {v: self.short(v, entry.structure_lr, 0)["best_validation_ppl"] for v in entry.variants}
                variant = min(tried, key=tried.get)
            lr, _ = self.choose_lr(variant, entry.grid)
            method, batch = variant, self.preset["batch_size"]
            on_record = self.short(method, lr, 0, batch)

            def run(method=method, lr=lr, batch=batch):
                data, _, general = self.data
                artifact, record = train(
                    method, lr, 0, self.preset["select_s"], self.recipient, data, self.preset, batch
                )
                record["general_ppl"] = score(artifact, self.recipient, general, self.tok)
                return record

            again = self.cell(f"machinecheck-{method}-lr{lr:g}-seed0-{tag}", run)
            out[name] = {"on_record": on_record, "again": again}
        return out

    def test_scores(self, artifact, test: list[str]) -> dict[str, float]:
        """Test in this process: per document, packed as validation is (`packed`), in windows of one block
        (`windowed`)."""
        return {
            "test_ppl_in_process": score(artifact, self.recipient, test, self.tok),
            "test_packed_ppl": score(artifact, self.recipient, test, self.tok, packed(self.preset)),
            "test_window_ppl": score(artifact, self.recipient, test, self.tok, windowed(self.preset)),
        }

    def protocol_check(self, name: str, choice: dict) -> dict:
        """The seed-0 `select_s` run again, scored on test per document, in windows of one block (`windowed`) and
        packed (`packed`) beside validation: whether a method's test/validation gap comes from the text, from scoring
        each document from its first token, or from positions past the training blocks."""

        def run():
            data, test, _ = self.data
            method, lr = choice["method"], choice["chosen_lr"]
            artifact, record = train(
                method, lr, 0, self.preset["select_s"], self.recipient, data, self.preset, choice["batch_size"]
            )
            record.update(self.test_scores(artifact, test))
            return record

        suffix = "" if choice["batch_size"] == self.preset["batch_size"] else f"-b{choice['batch_size']}"
        return self.cell(f"check-{name}{suffix}", run)


def summary(out: dict) -> str:
    keys = ("best_validation_ppl", "validation_ppl", "test_ppl", "general_ppl", "tokens_seen", "train_s")
    return ", ".join(f"{k} {out[k]:.4g}" for k in keys if isinstance(out.get(k), (int, float)))


# ----------------------------------------------------------------------------------------------- the report


def collect(preset_name: str, preset: dict) -> dict:
    """Everything on record for the preset, per domain, without running anything: each registry entry's choices
    made by the same `Domain.choose` the runs use, reading cells only."""
    domains = {}
    for name in preset["domains"]:
        folder = RUNS / preset_name / name
        cells = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}
        if "untouched" not in cells:
            continue
        dry = Domain(name, preset_name, preset, dry=True)
        untouched = dict(cells["untouched"])
        for extra in ("untouched-packed", "untouched-window"):  # their measures, not their wall clocks
            untouched.update({k: v for k, v in cells.get(extra, {}).items() if k != "cell_wall_clock_s"})
        out = {"untouched": untouched, "methods": {}, "incomplete": {}}
        out["checks"] = {k.removeprefix("check-"): v for k, v in cells.items() if k.startswith("check-")}
        out["machine_checks"] = {k: v for k, v in cells.items() if k.startswith("machinecheck-")}
        out["bf16_checks"] = {k: v for k, v in cells.items() if k.startswith("bf16-")}
        for name_ in METHODS:
            try:
                choice = dry.choose(name_)
            except Missing as missing:
                out["incomplete"][name_] = f"selection: cell {missing} not on record"
                continue
            method, lr, batch = choice["method"], choice["chosen_lr"], choice["batch_size"]
            if name_ == "organ":  # (the report's earlier keys, kept for make_results)
                out["slot_selection"], out["slot"] = choice["variant_validation_ppl"], method
            seeds = [
                c
                for k, c in cells.items()
                if k.startswith("short-") and c.get("method") == method and c.get("lr") == lr and c.get("budget_s") == preset["select_s"]
                and c.get("batch_size", preset["batch_size"]) == batch and "general_ppl" in c
            ]  # fmt: skip
            suffix = "" if batch == preset["batch_size"] else f"-b{batch}"
            out["methods"][name_] = {
                "method": method,
                "grid": choice["validation_ppl"],
                "lr": lr,
                "batch_size": batch,
                "choice": choice,
                "short": sorted(seeds, key=lambda c: c["seed"]),
                "final": cells.get(f"final-{name_}{suffix}"),
            }
        domains[name] = out
    return domains


def at(curve: list[dict], minutes: float) -> float | None:
    """Validation perplexity at the first point at or after `minutes` (a validation runs after the step that passes
    the mark), if it is within 25% of the mark; else None."""
    for p in curve:
        if p["minutes"] >= minutes * 0.999:
            return p["validation_ppl"] if p["minutes"] <= minutes * 1.25 else None
    return None


def spread(values: list[float]) -> str:
    if not values:
        return ""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f} (1 seed)"
    return f"{mean:.3f} ± {(max(values) - min(values)) / 2:.3f} ({len(values)} seeds)"


def results_table(payload: dict) -> list[str]:
    """The one results table: per domain, each registry entry's validation perplexity at `select_s` (mean ±
    half-range over the seeds), its test perplexity after `budget_s` pulled by repo id (one run, seed 0), and general
    text after it (forgetting), beside the untouched model. What is not on record yet is a dash."""
    p = payload["settings"]
    short, long = f"{p['select_s'] / MINUTE:g} min", f"{p['budget_s'] / MINUTE:g} min"
    names = [n for n in METHODS if any(n in d["methods"] for d in payload["domains"].values())]
    head = [
        "untouched",
        *[
            f"{n} ({', '.join(sorted({d['methods'][n]['method'] for d in payload['domains'].values() if n in d['methods']}))})"
            if n in ("organ", "growth_set")
            else n
            for n in names
        ],
    ]
    lines = [
        "| domain, measure | " + " | ".join(head) + " |",
        "|---|" + "---|" * len(head),
    ]
    for domain, d in payload["domains"].items():
        u, methods = d["untouched"], d["methods"]

        def cells(fn, methods=methods):
            return [fn(methods[n]) if n in methods else "-" for n in names]

        def seeds(r):
            vals = [c["best_validation_ppl"] for c in r["short"]]
            if not vals:
                return "-"
            mean = sum(vals) / len(vals)
            return (
                f"{mean:.2f} ± {(max(vals) - min(vals)) / 2:.2f} ({len(vals)})" if len(vals) > 1 else f"{mean:.2f} (1)"
            )

        def final(key):
            return lambda r: f"{r['final'][key]:.2f}" if r.get("final") else "-"

        lines += [
            f"| {domain}: validation @ {short}, mean ± half-range (seeds) | {u['validation_ppl']:.2f} | "
            + " | ".join(cells(seeds))
            + " |",
            f"| {domain}: test @ {long}, by repo id (seed 0) | {u['test_ppl']:.2f} | "
            + " | ".join(cells(final("test_ppl")))
            + " |",
            f"| {domain}: WikiText-2 test @ {long} (forgetting) | {u['general_ppl']:.2f} | "
            + " | ".join(cells(final("general_ppl")))
            + " |",
        ]
    return lines + [""]


def report(payload: dict) -> str:
    p = payload["settings"]
    lines = [
        f"### Learning curves on whole corpora ({payload['preset']} preset: up to {p['budget_s'] / MINUTE:g} min of "
        f"training per method, one pass, constant learning rate chosen on validation at {p['select_s'] / MINUTE:g} "
        "min; SmolLM2-135M, float32, 2 CPU cores)",
        "",
        "#### The results table",
        "",
        *results_table(payload),
    ]
    marks = [m / MINUTE for m in p["marks"] if m in (60, 120, 300, 600, 1200)] or [m / MINUTE for m in p["marks"]]
    for domain, d in payload["domains"].items():
        u = d["untouched"]
        lines += [
            f"#### {domain}: {u['train_tokens']:,} training tokens; untouched validation {u['validation_ppl']:.3f}, "
            f"test {u['test_ppl']:.3f}, general (WikiText-2 test) {u['general_ppl']:.3f}",
            "",
        ]
        if "slot" in d:
            lines.append(
                "Organ slot and width chosen on validation at lr 1e-3: "
                + ", ".join(f"{s} {v:.3f}" for s, v in d["slot_selection"].items())
                + f" -> **{d['slot']}**."
            )
            lines.append("")
        head = " | ".join(f"val @ {m:g} min" for m in marks)
        lines += [
            f"| method | lr (grid: validation ppl at {p['select_s'] / MINUTE:g} min) | {head} | tokens seen | test ppl "
            "(by repo id) | / untouched | / best LoRA | general ppl @ 2 min | general ppl @ end | "
            f"val @ {p['select_s'] / MINUTE:g} min, seeds |",
            "|" + "---|" * (9 + len(marks)),
        ]
        finals = {n: r["final"] for n, r in d["methods"].items() if r.get("final")}
        loras = [f["test_ppl"] for n, f in finals.items() if n.startswith("lora")]
        best_lora = min(loras) if loras else None
        untouched_vals = " | ".join(f"{u['validation_ppl']:.3f}" for _ in marks)
        lines.append(
            f"| untouched | | {untouched_vals} | | {u['test_ppl']:.3f} | 1.000 | | {u['general_ppl']:.3f} | "
            f"{u['general_ppl']:.3f} | |"
        )
        for name, r in d["methods"].items():
            f = r.get("final")
            short0 = next((c for c in r["short"] if c["seed"] == 0), None)
            # Before the 20-minute run is on record, its first minutes are the seed-0 selection run's (same rate,
            # seed and data order).
            curve = f["curve"] if f else (short0["curve"] if short0 else [])
            vals = " | ".join(f"{v:.3f}" if (v := at(curve, m)) is not None else "" for m in marks)
            grid = ", ".join(f"{k}: {v:.3f}" for k, v in r["grid"].items())
            label = f"{name} ({r['method']})" if r["method"] != name else name
            cols = [
                label,
                f"{r['lr']:g}, batch {r['batch_size']} ({grid})",
                vals,
                f"{f['tokens_seen']:,}" if f else "",
                f"{f['test_ppl']:.3f}" if f else "",
                f"{f['test_ppl'] / u['test_ppl']:.3f}" if f else "",
                f"{f['test_ppl'] / best_lora:.3f}" if f and best_lora else "",
                f"{short0['general_ppl']:.3f}" if short0 else "",
                f"{f['general_ppl']:.3f}" if f else "",
                spread([c["best_validation_ppl"] for c in r["short"]]),
            ]
            lines.append("| " + " | ".join(cols) + " |")
        lines.append("")
        lines += ratio_lines(d, marks) + protocol_lines(d) + machine_lines(d) + bf16_lines(d)
    if payload.get("missing"):
        lines += ["Not on record yet (rerun the command to add them; nothing on record is rerun):", ""]
        lines += [f"- {m}" for m in payload["missing"]] + [""]
    return "\n".join(lines)


def ratio_lines(d: dict, marks: list[float]) -> list[str]:
    """The organ's validation perplexity over the best LoRA's (the lower of r=8 and r=64) at each mark."""
    curves = {n: r["final"]["curve"] for n, r in d["methods"].items() if r.get("final")}
    if "organ" not in curves or not any(n.startswith("lora") for n in curves):
        return []
    cells = []
    for m in marks:
        organ = at(curves["organ"], m)
        loras = [v for n, c in curves.items() if n.startswith("lora") and (v := at(c, m)) is not None]
        cells.append(f"{m:g} min {organ / min(loras):.3f}" if organ is not None and loras else f"{m:g} min -")
    return ["Organ / best LoRA, validation perplexity (below 1: the organ ahead): " + ", ".join(cells) + ".", ""]


def machine_lines(d: dict) -> list[str]:
    """The seed-0 cells run again on a later day's machine, beside the cells on record: whether cells of different
    sessions can be compared at equal wall-clock."""
    rows = []
    for key, again in d.get("machine_checks", {}).items():
        method = again["method"]
        record = next((r["short"][0] for r in d["methods"].values() if r["method"] == method and r["short"]), None)
        if record is None:
            continue
        rows.append(
            f"| {method}, lr {again['lr']:g} | {record['tokens_seen']:,} | {again['tokens_seen']:,} "
            f"({again['tokens_seen'] / record['tokens_seen']:.2f}x) | {record['best_validation_ppl']:.3f} | "
            f"{again['best_validation_ppl']:.3f} | {key.rsplit('-', 2)[-2]} |"
        )
    if not rows:
        return []
    return [
        "Machine check: the same seed-0 cell run again later (wall-clock budgets depend on the CPU, and cells before "
        "2026-12-08 do not record theirs):",
        "",
        "| configuration | tokens in 2 min, on record | again | validation, on record | again | day |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def bf16_lines(d: dict) -> list[str]:
    """bf16 autocast against float32 (`--bf16-check`): the same configuration at equal wall-clock and at the float32
    run's steps, validation and tokens seen, beside the float32 run on the same machine."""
    rows = []
    for key, cell in sorted(d.get("bf16_checks", {}).items()):
        method, lr = cell["method"], cell["lr"]
        ref = next(
            (c for k, c in d.get("machine_checks", {}).items() if c["method"] == method and c["lr"] == lr), None
        )
        if ref is None:
            continue
        kind = f"equal steps ({cell['steps']})" if "-steps" in key else "equal wall-clock"
        rows.append(
            f"| {method}, lr {lr:g} | {kind} | {ref['best_validation_ppl']:.3f} ({ref['tokens_seen']:,} tokens) | "
            f"{cell['best_validation_ppl']:.3f} ({cell['tokens_seen']:,} tokens, {cell['train_s']:.0f} s) | "
            f"{cell['best_validation_ppl'] / ref['best_validation_ppl']:.3f} |"
        )
    if not rows:
        return []
    return [
        "bf16 autocast against float32 (same machine, seed 0; validation is scored during training as each run "
        "computes, so under bf16 autocast for the bf16 runs; WikiText-2 afterwards in float32 is in the cells):",
        "",
        "| configuration | comparison | float32 | bf16 | bf16 / float32 |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def num(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def protocol_lines(d: dict) -> list[str]:
    """Test scored four ways: per document by repo id (the table), per document in the training process before
    the round trip, per document in windows of one block (see `windowed`) and packed as validation is (`packed`)."""
    u = d["untouched"]
    rows = [(n, r["final"]) for n, r in d["methods"].items() if r.get("final") and "test_packed_ppl" in r["final"]]
    rows += [(f"{n}, {c['budget_s'] / MINUTE:g} min", c) for n, c in d.get("checks", {}).items()]
    if not rows or "test_packed_ppl" not in u:
        return []
    lines = [
        "| test perplexity | per document, by repo id | per document, in process | per document, windows of one "
        "block | packed as validation is | validation |",
        "|---|---|---|---|---|---|",
        f"| untouched | {u['test_ppl']:.3f} | {u['test_ppl']:.3f} | {num(u.get('test_window_ppl'))} | "
        f"{u['test_packed_ppl']:.3f} | {u['validation_ppl']:.3f} |",
    ]
    for name, f in rows:
        pulled = f"{f['test_ppl']:.3f}" if "test_ppl" in f else "- (not pushed)"
        lines.append(
            f"| {name} | {pulled} | {f['test_ppl_in_process']:.3f} | {num(f.get('test_window_ppl'))} | "
            f"{f['test_packed_ppl']:.3f} | {f['best_validation_ppl']:.3f} |"
        )
    return lines + [""]


def plot(payload: dict, folder: Path, preset_name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for domain, d in payload["domains"].items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for name, r in d["methods"].items():
            f = r.get("final")
            if not f:
                continue
            curve = f["curve"]
            label = f"{name} ({r['method']})" if r["method"] != name else name
            axes[0].plot([c["minutes"] for c in curve], [c["validation_ppl"] for c in curve], marker="o", label=label)
            axes[1].plot([c["tokens"] for c in curve], [c["validation_ppl"] for c in curve], marker="o", label=label)
        for ax, xlabel in zip(axes, ["training minutes (validation excluded)", "training tokens seen"], strict=True):
            ax.axhline(d["untouched"]["validation_ppl"], color="grey", linestyle="--", label="untouched")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation perplexity")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{domain}: whole training split, one pass (SmolLM2-135M, 2 CPU cores)")
        fig.tight_layout()
        path = folder / f"curves_{preset_name}_{domain}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    from common import RESULTS, machine, preset_parser, write_json, write_markdown

    parser = preset_parser(__doc__)
    parser.add_argument("--only", default=None, help="comma-separated domains of the preset, e.g. code")
    parser.add_argument("--report", action="store_true", help="run nothing: rebuild the JSON, table, plots")
    parser.add_argument("--methods", default=None, help=f"comma-separated registry entries (default all: {METHODS})")
    parser.add_argument(
        "--stage", choices=["short", "all"], default="all", help="short: selection, seeds and checks, no 20-min runs"
    )
    parser.add_argument(
        "--bf16-check", action="store_true", help="only: the organ and LoRA r=8 selection runs again in bf16 autocast"
    )
    parser.add_argument(
        "--machine-check", action="store_true", help="only: the organ's and LoRA r=8's seed-0 selection runs again"
    )
    args = parser.parse_args()
    name = "full" if args.full else "quick"
    preset = PRESETS[name]
    domains = args.only.split(",") if args.only else preset["domains"]
    for d in domains:
        if d not in preset["domains"]:
            raise SystemExit(f"--only {d!r}: not a domain of the {name} preset ({preset['domains']})")
    methods = args.methods.split(",") if args.methods else None
    for m in methods or []:
        if m not in REGISTRY:
            raise SystemExit(f"--methods {m!r}: not a registry entry ({METHODS})")
    if not args.report:
        start_hub()
        from common import load_smollm2

        recipient, tok = load_smollm2()
        try:
            for d in domains:
                if args.bf16_check:
                    Domain(d, name, preset, recipient, tok).bf16_check()
                elif args.machine_check:
                    Domain(d, name, preset, recipient, tok).machine_check()
                else:
                    Domain(d, name, preset, recipient, tok).run_all(methods, args.stage)
        finally:
            HUB.stop()
    payload = {"preset": name, "settings": preset, "machine": machine(), "domains": collect(name, preset)}
    payload["missing"] = []
    for d in preset["domains"]:
        on_record = len(list((RUNS / name / d).glob("*.json"))) if (RUNS / name / d).is_dir() else 0
        if d not in payload["domains"]:
            payload["missing"].append(f"{d} (nothing on record)")
            continue
        done = payload["domains"][d]
        for n, why in done["incomplete"].items():
            payload["missing"].append(f"{d}, {n}: {why}")
        for n, r in done["methods"].items():
            if "batch_selection" in r["choice"]:
                payload["missing"].append(f"{d}, {n}: {r['choice']['batch_selection']}")
            if len(r["short"]) < len(preset["seeds"]):
                payload["missing"].append(f"{d}, {n}: {len(preset['seeds']) - len(r['short'])} seed(s) at 2 min")
            if not r.get("final"):
                payload["missing"].append(f"{d}, {n}: the 20-minute run")
        payload["missing"].append(f"({d}: {on_record} cells on record)")
    payload["command"] = f"benchmarks/curves.py --{name}"
    write_json(f"curves_{name}", payload)
    plot(payload, RESULTS, name)
    write_markdown(f"curves_{name}", report(payload))
    print(report(payload))


if __name__ == "__main__":
    main()
