"""Package an organ from `gain.py --save-organs DIR` as the Space's default organ (bf16, self-contained).

    python benchmarks/space_organ.py /tmp/gain_organs/code-0-standalone_recovered

Casts the organ to bf16 (the Space repo stays small), records on its card the test perplexity it gives pulled into
a fresh SmolLM2 (code test documents, the gain benchmark's protocol) and the page's own code-sample figure, both
beside the untouched model, and saves it to spaces/not-hub-transplant/organ/. Refuses an organ that does not lower
the page's code perplexity by at least 15% at its default position (the Space must show a real gain).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "spaces" / "not-hub-transplant"))

import engine  # noqa: E402
from common import load_smollm2  # noqa: E402
from domains import DOMAINS  # noqa: E402
from quality import held_out, ppl  # noqa: E402

import not_hub  # noqa: E402
from not_hub.evaluation import add_evaluation_result  # noqa: E402

TARGET = HERE.parent / "spaces" / "not-hub-transplant" / "organ"
CORPUS = "CodeXGLUE Java/C# functions (code_x_glue_cc_code_to_code_trans), train split"


def main(source: str) -> None:
    organ = not_hub.OrganModel.from_pretrained(source, dtype="bfloat16")
    recipient, tok = load_smollm2()
    test = held_out(DOMAINS["code"]().test, 48, 1500)
    untouched_test, untouched_page = ppl(recipient, test, tok), ppl(recipient, engine.DOMAIN_SAMPLE, tok)
    with organ.transplanted(recipient) as transplant:
        grafted_test, grafted_page = ppl(recipient, test, tok), ppl(recipient, engine.DOMAIN_SAMPLE, tok)
        position, mode = transplant.position, transplant.mode
    gain = 1 - grafted_page / untouched_page
    print(
        f"page code sample: {untouched_page:.2f} -> {grafted_page:.2f} ({gain:.0%} lower); code test: "
        f"{untouched_test:.2f} -> {grafted_test:.2f}; {mode} at {position}"
    )
    if gain < 0.15:
        raise SystemExit(f"the organ lowers the page's code perplexity by {gain:.0%} only; the Space needs >= 15%")
    organ.config.training = {**(organ.config.training or {}), "corpus": CORPUS}
    for dataset, split, value, baseline in (
        ("CodeXGLUE Java/C# (48 test functions)", "test", grafted_test, untouched_test),
        ("the Space's code sample", "page", grafted_page, untouched_page),
    ):
        add_evaluation_result(
            organ.config,
            dataset=dataset,
            dataset_type="code_x_glue_cc_code_to_code_trans",
            split=split,
            value=value,
            baseline=baseline,
            position=position,
            mode=mode,
        )
    organ.save_pretrained(TARGET, overwrite_card=True, repo_id=engine.DEFAULT_ORGAN_REPO_ID)
    print(f"saved to {TARGET}")


if __name__ == "__main__":
    main(sys.argv[1])
