"""`not-hub train | recover | evaluate | sweep`: the NOT pipeline on real text, one plain function per command.

`train` takes an organ or an organ set (a growth set from `not-hub grow --every N`: trained jointly in place).

Data options are shared: `--data` gives the documents (files, folders, jsonl, Hub dataset ids); held-out documents
come from `--validation-data` / `--test-data` when given, otherwise from a seeded split of `--data` by document.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from ..cards import PRECISION_WORDS
from ..data import DocumentSplits, load_documents, make_blocks, split_documents, stream_blocks, stream_documents
from ..errors import InvalidArgumentError
from ..evaluation import add_evaluation_result, perplexity, position_sweep
from ..organ_set import OrganSet
from ..plan import MODES, get_mode
from ..plots import sweep_figure, sweep_result_curves
from ..precision import CHOICES as PRECISIONS
from ..training import DEFAULT_LR, DEFAULT_METHOD, recover, train_organ
from ..training import METHODS as TRAINING_METHODS
from .common import (
    block_size,
    format_options,
    fraction,
    load_model,
    model_options,
    non_negative_int,
    organ_from,
    organ_or_set_from,
    output_folder,
    positive_float,
    positive_int,
)

# Modes the CLI offers: those that need no extra size (a splice's `remove` is an API argument).
CLI_MODES = [name for name, mode in MODES.items() if mode.removes != "given"]


def add_data_options(p: argparse.ArgumentParser, *, split_choice: bool = False) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="documents: text/jsonl/json files, folders (one document per file) or Hub dataset ids",
    )
    g.add_argument(
        "--validation-data",
        nargs="+",
        default=None,
        help="held-out validation documents (default: a seeded split of --data by document)",
    )
    g.add_argument(
        "--test-data",
        nargs="+",
        default=None,
        help="held-out test documents (default: a seeded split of --data by document)",
    )
    g.add_argument(
        "--unit",
        choices=["file", "line", "paragraph"],
        default=None,
        help="how text files are cut into documents (default: file in folders, paragraph for a file)",
    )
    g.add_argument("--text-field", default="text", help="text column of json/jsonl files and Hub datasets")
    g.add_argument("--limit-docs", type=positive_int, default=None, help="use at most this many documents per source")
    g.add_argument("--split-seed", type=non_negative_int, default=0, help="seed of the by-document split (default 0)")
    g.add_argument("--validation-fraction", type=fraction, default=0.1, help="share of documents for validation")
    g.add_argument("--test-fraction", type=fraction, default=0.1, help="share of documents for test")
    g.add_argument("--block-size", type=block_size, default=256, help="tokens per training block (default 256)")
    if split_choice:
        g.add_argument(
            "--split",
            choices=["validation", "test"],
            default="validation",
            help="which held-out documents to score (choose on validation, report on test)",
        )
        g.add_argument("--max-eval-docs", type=positive_int, default=None, help="score at most this many documents")
        g.add_argument(
            "--max-length",
            type=block_size,
            default=None,
            help="perplexity window in tokens (default 512, or the model's context when shorter)",
        )
        g.add_argument(
            "--stride", type=positive_int, default=None, help="perplexity window step (default max-length/2)"
        )


def add_training_options(p: argparse.ArgumentParser, *, lr_help: str) -> None:
    g = p.add_argument_group("training")
    g.add_argument(
        "--epochs", type=positive_float, default=1.0, help="passes over the training blocks (default 1: seen once)"
    )
    g.add_argument("--lr", type=positive_float, default=None, help=f"peak learning rate (default {lr_help})")
    g.add_argument(
        "--warmup-ratio",
        type=fraction,
        default=0.05,
        help="linear warmup share of the run, then linear decay to 0 (default 0.05; of the time budget if given)",
    )
    g.add_argument(
        "--max-seconds",
        type=positive_float,
        default=None,
        help="stop after this much training time (validation excluded); warmup and decay complete within it",
    )
    g.add_argument(
        "--max-tokens", type=positive_int, default=None, help="stop after this many training tokens (all processes)"
    )
    g.add_argument(
        "--stream",
        action="store_true",
        help="stream --data (any size; split by a seeded hash of each document) instead of loading it; needs "
        "--max-tokens, --max-seconds or --max-steps",
    )
    g.add_argument(
        "--validation-blocks",
        type=positive_int,
        default=64,
        help="validation blocks scored during training (default 64: the first ones of the validation split)",
    )
    g.add_argument("--report-to", default="none", help="trackers, as transformers' report_to (default none)")
    g.add_argument(
        "--mixed-precision",
        choices=PRECISIONS,
        default="auto",
        help="auto (default): bf16 autocast where the GPU or CPU does bf16 natively, else float32; or force no, bf16, "
        "fp16. The choice is printed and recorded in the organ's card",
    )
    g.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)"
    )
    g.add_argument("--batch-size", type=positive_int, default=8, help="blocks per process per micro-batch (default 8)")
    g.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps")
    g.add_argument(
        "--eval-every", type=positive_int, default=None, help="validate every N steps (default: each epoch)"
    )
    g.add_argument(
        "--save-every", type=positive_int, default=None, help="checkpoint every N steps (default: each epoch)"
    )
    g.add_argument("--run-dir", default=None, help="checkpoints here; an interrupted run resumes from them")
    g.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="start over in --run-dir even if it holds another run's checkpoints",
    )
    g.add_argument("--seed", type=non_negative_int, default=0, help="training seed (data order)")


def _sources(values: list[str] | None, args) -> list[str] | None:
    if not values:
        return None
    docs: list[str] = []
    for source in values:
        docs += load_documents(source, unit=args.unit, text_field=args.text_field, limit=args.limit_docs)
    return docs


def _splits(args) -> DocumentSplits:
    pool = _sources(args.data, args)
    validation, test = _sources(args.validation_data, args), _sources(args.test_data, args)
    description = {
        "sources": args.data,
        "validation_sources": args.validation_data,
        "test_sources": args.test_data,
        "unit": args.unit,
        "limit_docs": args.limit_docs,
    }
    if validation is not None and test is not None:
        return DocumentSplits(pool, validation, test, description={**description, "split": "given"})
    split = split_documents(
        pool,
        validation=0.0 if validation is not None else args.validation_fraction,
        test=0.0 if test is not None else args.test_fraction,
        seed=args.split_seed,
        description={**description, "split": "by document, seeded"},
    )
    return DocumentSplits(
        split.train,
        validation if validation is not None else split.validation,
        test if test is not None else split.test,
        description=split.description,
    )


def _training_kwargs(args) -> dict:
    return dict(
        epochs=args.epochs,
        lr=args.lr,
        warmup_ratio=args.warmup_ratio,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        max_tokens=args.max_tokens,
        max_seconds=args.max_seconds,
        report_to=args.report_to,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        eval_every=args.eval_every,
        save_every=args.save_every,
        output_dir=args.run_dir,
        resume=args.resume,
        seed=args.seed,
    )


def _held_out(args, splits: DocumentSplits) -> list[str]:
    docs = splits.validation if args.split == "validation" else splits.test
    if args.max_eval_docs and len(docs) > args.max_eval_docs:
        # A seeded, order-independent subset, so every source (e.g. both languages) is represented.
        docs = sorted(docs, key=lambda d: hashlib.sha256(f"eval|{d}".encode()).hexdigest())[: args.max_eval_docs]
    return docs


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str))
        print(f"wrote {path}")


def _training_data(args, tokenizer):
    """(training blocks, validation documents scored after training): loaded and split, or streamed."""
    if not args.stream:
        splits = _splits(args)
        blocks = make_blocks(
            splits, tokenizer, args.block_size, seed=args.seed, max_validation_blocks=args.validation_blocks
        )
        print(
            f"training {getattr(args, 'method', 'recovery')} on {blocks.description['train_tokens']:,} tokens "
            f"({blocks.description['train_blocks']} blocks, {len(splits.train)} documents)"
        )
        return blocks, splits.validation[: getattr(args, "eval_docs", 0)]
    if args.max_tokens is None and args.max_seconds is None and args.max_steps is None:
        raise InvalidArgumentError(
            "--stream reads a corpus of unknown length; pass --max-tokens, --max-seconds or --max-steps"
        )
    ignored = [
        flag
        for flag, value in (
            ("--validation-data", getattr(args, "validation_data", None)),
            ("--test-data", getattr(args, "test_data", None)),
            ("--limit-docs", getattr(args, "limit_docs", None)),
        )
        if value
    ]
    if ignored:  # (they would be silently ignored: a stream is split by a hash of each document, and not counted)
        raise InvalidArgumentError(
            f"{', '.join(ignored)} cannot be used with --stream: a streamed corpus is split by a seeded hash of each "
            "document (--validation-fraction, --test-fraction) and bounded by --max-tokens/--max-seconds/--max-steps; "
            "drop them, or drop --stream to load the corpus"
        )
    opts = dict(
        validation=args.validation_fraction, test=args.test_fraction, seed=args.split_seed, text_field=args.text_field
    )
    blocks = stream_blocks(
        args.data, tokenizer, args.block_size, unit=args.unit, max_validation_blocks=args.validation_blocks, **opts
    )
    held_out = stream_documents(args.data, bucket="validation", unit=args.unit, **opts)
    docs = [ex["text"] for ex in held_out.take(getattr(args, "eval_docs", 0))]
    print(
        f"training {getattr(args, 'method', 'recovery')} on a stream of {', '.join(args.data)} (split by document, seeded)"
    )
    return blocks, docs


def cmd_train(args) -> int:
    """Train an organ (standalone: the paper's wrapper of the donor's frozen embeddings, norm and head; or in situ)."""

    output_folder(args.out)
    clock = {"start": time.perf_counter()}
    organ = organ_or_set_from(args, args.organ, args.revision)
    if isinstance(organ, OrganSet):
        return _train_set(args, organ)
    donor, tokenizer = load_model(args, args.donor or organ.config.base_model, args.donor_revision)
    clock["loaded"] = time.perf_counter()
    blocks, docs = _training_data(args, tokenizer)
    clock["data"] = time.perf_counter()
    metrics = train_organ(organ, donor, blocks, method=args.method, **_training_kwargs(args))
    clock["trained"] = time.perf_counter()
    organ.save_pretrained(args.out)
    loss = f"{metrics.final_train_loss:.4f}" if metrics.final_train_loss is not None else "-"
    print(
        f"trained {metrics.steps} steps ({_precision(metrics.mixed_precision)}), {metrics.tokens_seen:,} tokens in "
        f"{metrics.wall_clock_s:.0f}s (first step "
        f"after {metrics.first_step_s}s): final train loss {loss}, best validation loss "
        f"{metrics.best_validation_loss} at step {metrics.best_step}; saved to {args.out}"
    )
    # What a user pulling this organ gets: the donor's validation perplexity with and without it.
    if docs:
        base = perplexity(donor, docs, tokenizer=tokenizer)
        with organ.transplanted(donor):
            grafted = perplexity(donor, docs, tokenizer=tokenizer)
        print(
            f"validation perplexity ({len(docs)} documents): donor {base.perplexity:.3f}, donor with the organ "
            f"{grafted.perplexity:.3f} ({grafted.perplexity / base.perplexity:.3f}x)"
        )
    clock["end"] = time.perf_counter()
    # Where the wall time went: only the training part is bounded by --max-seconds; the rest is listed so it can be
    # bounded too (--limit-docs, --validation-blocks, --eval-docs 0).
    print(
        f"wall time {clock['end'] - clock['start']:.0f}s: loading {clock['loaded'] - clock['start']:.1f}s, data "
        f"{clock['data'] - clock['loaded']:.1f}s, training {clock['trained'] - clock['data']:.1f}s (of which "
        f"validation {metrics.validation_s:.1f}s, first step after {metrics.first_step_s}s), saving and scoring "
        f"{clock['end'] - clock['trained']:.1f}s"
    )
    return 0


def _precision(mixed: str) -> str:
    return PRECISION_WORDS.get(mixed, mixed)


def _train_set(args, organ_set: OrganSet) -> int:
    """An organ set (e.g. a growth set from `not-hub grow --every N`) trains jointly at its recorded places in the
    frozen donor (`recover(radius=0)`), then is saved as a set; the donor is left as it was."""
    if args.method != "in_situ":
        raise InvalidArgumentError(
            f"--method {args.method} cannot train an organ set ({args.organ}): its organs train jointly at their "
            "places in the donor; drop --method (in_situ)"
        )
    donor, tokenizer = load_model(args, args.donor or organ_set.organs[0].config.base_model, args.donor_revision)
    blocks, docs = _training_data(args, tokenizer)
    base = perplexity(donor, docs, tokenizer=tokenizer) if docs else None
    kwargs = _training_kwargs(args)
    kwargs["lr"] = kwargs["lr"] or DEFAULT_LR["in_situ"]
    transplants = organ_set.transplant_into(donor)
    try:
        metrics = recover(donor, transplants, blocks, radius=0, **kwargs)
        grafted = perplexity(donor, docs, tokenizer=tokenizer) if docs else None
        OrganSet.from_transplants(transplants).save_pretrained(args.out)
    finally:
        for t in reversed(transplants):
            t.explant()
    print(
        f"trained a set of {len(organ_set)} organs jointly: {metrics.steps} steps ({_precision(metrics.mixed_precision)}), "
        f"{metrics.tokens_seen:,} tokens in "
        f"{metrics.wall_clock_s:.0f}s, best validation loss {metrics.best_validation_loss}; saved to {args.out}"
    )
    if base is not None:
        print(
            f"validation perplexity ({len(docs)} documents): donor {base.perplexity:.3f}, donor with the set "
            f"{grafted.perplexity:.3f} ({grafted.perplexity / base.perplexity:.3f}x)"
        )
    return 0


def cmd_sweep(args) -> int:
    """Perplexity of the recipient with the organ at each position (and mode), with mean and variance."""

    organ = organ_from(args, args.organ, args.revision)
    recipient, tokenizer = load_model(args, args.recipient, args.recipient_revision)
    splits = _splits(args)
    docs = _held_out(args, splits)
    t0 = time.perf_counter()
    sweep = position_sweep(
        organ,
        recipient,
        docs,
        tokenizer=tokenizer,
        modes=args.modes,
        positions=args.positions,
        max_length=args.max_length,
        stride=args.stride,
    )
    result = {
        **sweep.to_dict(),
        "split": args.split,
        "documents": len(docs),
        "organ": args.organ,
        "wall_clock_s": round(time.perf_counter() - t0, 1),
    }
    print(f"untouched {args.split} perplexity {sweep.baseline.perplexity:.3f} over {sweep.baseline.tokens:,} tokens")
    for row in sweep.rows:
        print(
            f"  {row['mode']:<8} position {row['position']:>3}: {row['perplexity']:.3f} "
            f"({row['ratio_to_baseline']:.3f}x untouched)"
        )
    for mode, stats in sweep.summary().items():
        print(
            f"{mode}: best position {stats['best_position']} ({stats['best_perplexity']:.3f}); mean "
            f"{stats['mean']:.3f}, variance {stats['variance']:.3f}"
        )
    _write_json(args.out, result)
    args.result = result
    if args.plot:
        sweep_figure(
            sweep_result_curves(sweep.rows),
            baseline=sweep.baseline.perplexity,
            ylabel=f"{args.split} perplexity",
            own_slot=organ.config.layer_range[0],
            path=args.plot,
        )
        print(f"wrote {args.plot}")
    return 0


def cmd_recover(args) -> int:
    """Transplant an organ, then recovery-fine-tune it and its neighbouring layers (everything else frozen)."""

    output_folder(args.organ_out, "--organ-out")
    output_folder(args.save_to, "--save-to")
    if args.save_to and get_mode(args.mode).bridges:
        raise InvalidArgumentError(
            "--save-to with --mode bridge: a bridge-mode recipient is not a plain transformers model (a reload "
            "would lose the bridges). Use --organ-out to keep the organ with its bridges, or --mode replace/insert"
        )
    organ = organ_from(args, args.organ, args.revision)
    recipient, tokenizer = load_model(args, args.recipient, args.recipient_revision)
    blocks, _ = _training_data(args, tokenizer)
    transplant = organ.transplant_into(recipient, position=args.position, mode=args.mode)
    metrics = recover(recipient, transplant, blocks, radius=args.radius, **_training_kwargs(args))
    print(
        f"recovered in {metrics.wall_clock_s:.0f}s: best validation loss {metrics.best_validation_loss} at "
        f"step {metrics.best_step}"
    )
    if args.organ_out:
        transplant.to_organ().save_pretrained(args.organ_out)
        print(
            f"saved the recovered organ to {args.organ_out}: the organ and the {2 * args.radius} recovered neighbours "
            "(fewer at the ends of the stack) as one block; `transplant_into(recipient)` splices it back in"
        )
    if args.save_to:
        recipient.save_pretrained(args.save_to)
        tokenizer.save_pretrained(args.save_to)
        print(f"saved the recovered recipient to {args.save_to}")
    return 0


def cmd_evaluate(args) -> int:
    """Perplexity on held-out documents: the model as is and, with --organ, with the organ transplanted."""
    if args.record and args.organ and not Path(args.organ).is_dir():
        raise InvalidArgumentError(
            f"--record writes the result into the organ's folder, and {args.organ!r} is not a local folder (a Hub "
            f"repo id would become a new folder ./{args.organ}/). Download it first (`not-hub pull {args.organ}` "
            "prints its folder) and pass that folder, or drop --record"
        )
    model, tokenizer = load_model(args, args.model, args.recipient_revision)
    docs = _held_out(args, _splits(args))
    t0 = time.perf_counter()
    base = perplexity(model, docs, tokenizer=tokenizer, max_length=args.max_length, stride=args.stride, progress=True)
    result = {
        "model": args.model,
        "split": args.split,
        "documents": len(docs),
        "perplexity": base.perplexity,
        "nll": base.nll,
        "tokens": base.tokens,
        "wall_clock_s": round(time.perf_counter() - t0, 1),
    }
    print(f"{args.model}: {args.split} perplexity {base.perplexity:.3f} over {base.tokens:,} tokens")
    if args.organ:
        organ = organ_from(args, args.organ, args.revision)
        with organ.transplanted(model, position=args.position, mode=args.mode) as transplant:
            t0 = time.perf_counter()
            grafted = perplexity(
                model, docs, tokenizer=tokenizer, max_length=args.max_length, stride=args.stride, progress=True
            )
        result["transplanted"] = {
            "organ": args.organ,
            "position": transplant.position,
            "mode": args.mode,
            "perplexity": grafted.perplexity,
            "nll": grafted.nll,
            "wall_clock_s": round(time.perf_counter() - t0, 1),
        }
        print(
            f"with {args.organ} at {transplant.position} ({args.mode}): {grafted.perplexity:.3f} "
            f"({grafted.perplexity / base.perplexity:.3f}x untouched)"
        )
        if args.record:
            add_evaluation_result(
                organ.config,
                dataset=args.dataset_name or ",".join(args.data),
                split=args.split,
                value=grafted.perplexity,
                baseline=base.perplexity,
                position=transplant.position,
                mode=args.mode,
            )
            organ.save_pretrained(args.organ)
            print(f"recorded the result in {args.organ}/config.json and its card")
    _write_json(args.out, result)
    args.result = result
    return 0


def train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--eval-docs",
        type=non_negative_int,
        default=64,
        help="validation documents scored after training, donor with and without the organ (default 64; 0: none)",
    )
    p.add_argument("organ", help="organ folder or Hub repo id to start from (e.g. from `not-hub extract`)")
    p.add_argument("--donor", default=None, help="the donor model (default: the organ's base_model)")
    p.add_argument("--donor-revision", default=None, help="the donor repo's revision")
    p.add_argument(
        "--method",
        choices=list(TRAINING_METHODS),
        default=DEFAULT_METHOD,
        help=f"standalone (the paper), in_situ (the organ at its slot in the frozen donor) or recovered (standalone, "
        f"then recovery with its neighbours, which the organ then carries); default {DEFAULT_METHOD}",
    )
    p.add_argument("--out", required=True, help="folder to save the trained organ into")
    add_data_options(p)
    add_training_options(p, lr_help=", ".join(f"{m} {DEFAULT_LR[m]:g}" for m in TRAINING_METHODS))
    model_options(p, "branch, tag or commit sha of the organ repo")


def sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("organ", help="organ folder or Hub repo id")
    p.add_argument("--recipient", default="smollm2", help="recipient model (default: the embedded SmolLM2)")
    p.add_argument(
        "--modes",
        nargs="+",
        choices=CLI_MODES,
        default=["replace"],
        help="transplant modes to sweep (default: replace)",
    )
    p.add_argument(
        "--positions", type=non_negative_int, nargs="+", default=None, help="positions (default: all valid)"
    )
    p.add_argument("--out", default=None, help="write the sweep as JSON here")
    p.add_argument("--plot", default=None, help="write a perplexity-vs-position PNG here")
    add_data_options(p, split_choice=True)
    model_options(p, "branch, tag or commit sha of the organ repo", recipient=True)
    format_options(p)


def recover_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("organ", help="organ folder or Hub repo id")
    p.add_argument("--recipient", default="smollm2", help="recipient model (default: the embedded SmolLM2)")
    p.add_argument(
        "--position", type=non_negative_int, required=True, help="where to transplant (e.g. the sweep's best)"
    )
    p.add_argument("--mode", choices=CLI_MODES, default="replace", help="transplant mode")
    p.add_argument(
        "--radius", type=non_negative_int, default=1, help="neighbouring layers trained on each side (default 1)"
    )
    p.add_argument("--organ-out", default=None, help="save the recovered organ here")
    p.add_argument("--save-to", default=None, help="save the recovered recipient (plain transformers model) here")
    add_data_options(p)
    add_training_options(p, lr_help=f"{DEFAULT_LR['recovery']:g}")
    model_options(p, "branch, tag or commit sha of the organ repo", recipient=True)


def evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model to score: Hub id, folder, .gguf file or 'smollm2'")
    p.add_argument("--organ", default=None, help="also score the model with this organ transplanted")
    p.add_argument(
        "--position", type=non_negative_int, default=None, help="transplant position (default: the organ's start)"
    )
    p.add_argument("--mode", choices=CLI_MODES, default="replace", help="transplant mode")
    p.add_argument("--record", action="store_true", help="write the result into the organ's config and card")
    p.add_argument("--dataset-name", default=None, help="dataset name recorded with --record")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    add_data_options(p, split_choice=True)
    model_options(p, "branch, tag or commit sha of the organ repo", recipient=True)
    format_options(p)
