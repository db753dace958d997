"""`not-hub extract | grow | inspect | transplant`: cutting or growing organs, looking at them, grafting them."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..errors import InvalidArgumentError
from ..evaluation import perplexity
from ..extraction import excise, extract_organ
from ..gguf_export import OUTTYPES, export_gguf, push_gguf
from ..grafted import graft_organs
from ..growth import grow_organ
from ..organ_set import OrganSet
from .common import (
    format_options,
    load_model,
    model_options,
    non_negative_int,
    organ_from,
    organ_or_set_from,
    output_folder,
    positive_int,
)

# A short general-English sample (written for this project) for before/after perplexity in the demo.
SAMPLE_TEXT = (
    "The river rose slowly through the night, and by morning the lower fields were under water. Farmers moved "
    "their animals to the hill behind the village, where the old church stood. The mayor called a meeting in the "
    "school hall to decide how the town would repair the bridge before the markets opened again in spring. "
    "Everyone agreed that the work should begin as soon as the water went down."
)
DEFAULT_PROMPT = "The capital of France is"


def cmd_extract(args) -> int:
    """Cut an organ out of a donor and save it."""

    output_folder(args.out)
    donor, _ = load_model(args, args.model, args.revision)
    organ = extract_organ(
        donor, layer_range=tuple(args.layer_range) if args.layer_range else None, revision=args.revision
    )
    organ.save_pretrained(args.out)
    print(f"saved organ layers {organ.config.layer_range} of {organ.config.base_model} to {args.out}")
    return 0


def cmd_grow(args) -> int:
    """Make a growth organ (new identity layers: the model's output is unchanged until they are trained), or a growth
    set (one new layer after every N-th layer), and save it; then `not-hub train` it and `not-hub push` it."""
    output_folder(args.out)
    if (args.position is None) == (args.every is None):
        raise InvalidArgumentError(
            "pass --position P (one growth organ of --num-layers layers inserted before layer P) or --every N (a "
            "growth set: one new layer after every N-th layer), not both or neither"
        )
    model, _ = load_model(args, args.model, args.revision, with_tokenizer=False)
    depth = model.config.num_hidden_layers
    if args.position is not None:
        organ = grow_organ(model, args.position, num_layers=args.num_layers, revision=args.revision)
        organ.save_pretrained(args.out)
        print(
            f"saved a growth organ of {args.num_layers} identity layer(s), to insert before layer {args.position} of "
            f"{organ.config.base_model}, to {args.out}; train it with: not-hub train {args.out} --data ..."
        )
        return 0
    if not 1 <= args.every <= depth:
        raise InvalidArgumentError(
            f"--every {args.every} is not allowed for a {depth}-layer model; expected 1..{depth}"
        )
    positions = list(range(args.every, depth + 1, args.every))
    organs = [grow_organ(model, p, revision=args.revision) for p in positions]
    # Each placement counts the layers the set's earlier organs added (as OrganSet.from_transplants records them).
    placements = [{"mode": "insert", "position": p + i} for i, p in enumerate(positions)]
    OrganSet(organs, placements).save_pretrained(args.out)
    print(
        f"saved a growth set of {len(organs)} identity layers (after layers {', '.join(map(str, positions))}) of "
        f"{organs[0].config.base_model} to {args.out}; train it with: not-hub train {args.out} --data ..."
    )
    return 0


def cmd_export(args) -> int:
    """Write a model with organs grafted as one GGUF file (llama.cpp, ollama, LM Studio), by llama.cpp's converter."""
    out = Path(args.out)
    if out.is_dir():
        raise InvalidArgumentError(f"--out {args.out!r} is a folder; pass the .gguf file to write")
    organs = [organ_or_set_from(args, ref, args.revision) for ref in args.organ or []]
    model, tokenizer = load_model(args, args.model, args.recipient_revision)
    graft_organs(model, organs)  # as load_grafted grafts them
    export_gguf(model, tokenizer, out, outtype=args.outtype)
    print(
        f"wrote {out} ({args.outtype}, {out.stat().st_size / 2**20:.1f} MB, {model.config.num_hidden_layers} layers)"
    )
    if args.push_to:
        names = [str(ref) for ref in args.organ or []]
        base = getattr(model.config, "_name_or_path", None) or args.model
        print(
            push_gguf(out, args.push_to, base_model=base if "/" in str(base) else None, organs=names, token=args.token)
        )
    return 0


def cmd_inspect(args) -> int:
    """Show an organ's metadata and, given a recipient, the compatibility report."""
    organ = organ_from(args, args.organ, args.revision)
    config = organ.config
    info = {
        "base_model": config.base_model,
        "base_model_revision": config.base_model_revision,
        "donor_model_type": config.donor_model_type,
        "layer_range": list(config.layer_range),
        "layers": [{"role": r, "index": i} for r, i in zip(config.layer_roles, config.layer_indices, strict=True)],
        "default_transplant": config.default_transplant,
        "donor_num_hidden_layers": config.donor_num_hidden_layers,
        "format_version": config.format_version,
        "not_hub_version": config.not_hub_version,
        "architecture_inferred": config.architecture.get("inferred", False),
        "signature": {k: v for k, v in config.signature.items() if k != "parameter_shapes"},
        "parameters": sum(p.numel() for p in organ.parameters()),
        "training": config.training,
        "evaluation": config.evaluation,
    }
    report = None
    if args.recipient:  # the compatibility check needs the model only, not its tokenizer
        recipient, _ = load_model(args, args.recipient, args.recipient_revision, with_tokenizer=False)
        report = organ.check_compatibility(recipient)
    if args.format == "json":
        if report is not None:
            info["compatibility"] = {
                "compatible": report.compatible,
                "rows": [
                    {"field": r.field, "organ": r.donor, "recipient": r.recipient, "blocking": r.blocking}
                    for r in report.rows
                ],
            }
        print(json.dumps(info, indent=2, default=str))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if value not in (None, {}, []):
            print(f"{key:<{width}}  {json.dumps(value, default=str) if isinstance(value, (dict, list)) else value}")
    if report is not None:
        print()
        print(report)
    return 0


@torch.no_grad()
def _greedy(model, tokenizer, prompt: str, n: int = 16) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def cmd_transplant(args) -> int:
    """Graft an organ into a recipient, report the effect, optionally save, and explant again."""

    if not args.prompt.strip():
        raise InvalidArgumentError("--prompt is empty; pass a few words for the model to continue")
    output_folder(args.save_to, "--save-to")
    recipient, tokenizer = load_model(args, args.recipient, args.recipient_revision)
    ids = tokenizer(SAMPLE_TEXT, return_tensors="pt").input_ids
    logits_before = recipient(ids).logits
    ppl_before = perplexity(recipient, [SAMPLE_TEXT], tokenizer=tokenizer).perplexity
    text_before = _greedy(recipient, tokenizer, args.prompt)
    state_before = {k: v.clone() for k, v in recipient.state_dict().items()}

    organ_path = args.organ
    if organ_path is None:
        # The embedded demo: cut the paper's default organ from the recipient itself, save and reload it.
        t0 = time.perf_counter()
        organ = extract_organ(recipient)
        organ_path = Path(args.work_dir) / f"organ-{organ.config.layer_range[0]}-{organ.config.layer_range[1]}"
        organ.save_pretrained(organ_path)
        print(
            f"extracted layers {organ.config.layer_range} and saved them to {organ_path} "
            f"in {time.perf_counter() - t0:.1f}s"
        )
    t0 = time.perf_counter()
    organ = organ_from(args, str(organ_path), args.revision)
    print(
        f"loaded organ {organ_path} (sha256 of {len(organ.config.tensor_sha256)} tensors verified) "
        f"in {time.perf_counter() - t0:.2f}s"
    )
    print(organ.check_compatibility(recipient))

    t0 = time.perf_counter()
    with organ.transplanted(recipient, position=args.position, mode=args.mode) as transplant:
        print(
            f"\ntransplanted: {transplant} in {1000 * (time.perf_counter() - t0):.1f} ms; recipient now has "
            f"{recipient.config.num_hidden_layers} layers, organ at {transplant.layer_indices}"
        )
        logits_after = recipient(ids).logits
        ppl_after = perplexity(recipient, [SAMPLE_TEXT], tokenizer=tokenizer).perplexity
        print(f"max |logits after - logits before| = {(logits_after - logits_before).abs().max().item():.3g}")
        print(f"sample perplexity: untouched {ppl_before:.2f} -> transplanted {ppl_after:.2f}")
        print(
            f"greedy '{args.prompt}':\n  untouched:    {text_before!r}\n  transplanted: "
            f"{_greedy(recipient, tokenizer, args.prompt)!r}"
        )
        if args.save_to:
            recipient.save_pretrained(args.save_to)
            tokenizer.save_pretrained(args.save_to)
            print(f"saved the transplanted recipient to {args.save_to} (loads with plain transformers)")
    restored = recipient.state_dict()
    exact = restored.keys() == state_before.keys() and all(
        torch.equal(restored[k], v) for k, v in state_before.items()
    )
    print(f"explanted: recipient restored bit-exactly: {exact}")
    return 0 if exact else 1


def cmd_excise(args) -> int:
    """Remove a range of layers from a model (layer pruning); save the pruned model and, optionally, the removed
    layers as an organ that can be put back."""
    output_folder(args.out)
    output_folder(args.organ_out, "--organ-out")
    model, tokenizer = load_model(args, args.model, args.revision)
    organ, _ = excise(model, tuple(args.layer_range), revision=args.revision)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(
        f"removed layers [{args.layer_range[0]}, {args.layer_range[1]}): {model.config.num_hidden_layers} layers left; "
        f"saved the pruned model to {args.out} (loads with plain transformers)"
    )
    if args.organ_out:
        organ.save_pretrained(args.organ_out)
        print(
            f"saved the removed layers to {args.organ_out}; put them back with "
            f"`not-hub transplant --organ {args.organ_out} --recipient {args.out} --position {args.layer_range[0]} "
            "--mode insert`"
        )
    return 0


def layer_range_argument(p: argparse.ArgumentParser, help: str, required: bool = False) -> None:
    p.add_argument(
        "--layer-range", type=non_negative_int, nargs=2, required=required, metavar=("START", "STOP"), help=help
    )


def excise_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model: Hub id, folder, .gguf file, or 'smollm2' (embedded)")
    layer_range_argument(p, "half-open range of layers to remove", required=True)
    p.add_argument("--out", required=True, help="folder to save the pruned model (plain transformers) into")
    p.add_argument("--organ-out", default=None, help="also save the removed layers as an organ here")
    model_options(p, "branch, tag or commit sha of the model repo")


def extract_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="donor: Hub id, folder, .gguf file, or 'smollm2' (embedded)")
    layer_range_argument(p, "half-open range of donor layers (default: 3 layers from floor(L/3))")
    p.add_argument("--out", required=True, help="folder to save the organ into")
    model_options(p, "branch, tag or commit sha of the donor model repo (recorded in the organ)")


def grow_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the model to grow: Hub id, folder, .gguf file, or 'smollm2' (embedded)")
    p.add_argument(
        "--position", type=non_negative_int, default=None, help="one growth organ, inserted before this layer"
    )
    p.add_argument(
        "--num-layers", type=positive_int, default=3, help="layers of the growth organ (with --position; default 3)"
    )
    p.add_argument(
        "--every", type=positive_int, default=None, help="a growth set instead: one new layer after every N-th layer"
    )
    p.add_argument("--out", required=True, help="folder to save the growth organ or set into")
    model_options(p, "branch, tag or commit sha of the model repo (recorded in the organ)")


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the recipient: Hub id, folder, .gguf file, or 'smollm2' (embedded)")
    p.add_argument(
        "--organ", action="append", help="organ or organ set (folder or repo id) to graft first; repeat for several"
    )
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16", help="tensor type (default f16; q8_0 quantises)")
    p.add_argument("--push-to", default=None, help="also upload the file, with a card, to this Hub repo")
    model_options(p, "branch, tag or commit sha of the organ repos", recipient=True)


def inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("organ", help="organ folder or Hub repo id")
    p.add_argument("--recipient", default=None, help="also print the compatibility report with this model")
    model_options(p, "branch, tag or commit sha of the organ repo", recipient=True)
    format_options(p)


def transplant_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--organ",
        default=None,
        help="organ folder or Hub repo id (default: cut the default organ from the recipient itself)",
    )
    p.add_argument(
        "--recipient",
        default="smollm2",
        help="Hub id, folder, .gguf file, or 'smollm2' (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--position",
        type=non_negative_int,
        default=None,
        help="0-based index of the first recipient layer the organ occupies (default: its donor start)",
    )
    p.add_argument(
        "--mode",
        choices=["replace", "insert"],
        default="replace",
        help="replace layers [position, position+k) or insert before position (default: replace)",
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt for the before/after greedy generation")
    p.add_argument("--save-to", default=None, help="save the transplanted recipient (plain transformers model)")
    p.add_argument("--work-dir", default="organs", help="where the demo saves the organ it extracts")
    model_options(p, "branch, tag or commit sha of the organ repo", recipient=True)
