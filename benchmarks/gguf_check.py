"""Does llama.cpp run a grafted model as transformers does? The GGUF export checked by llama.cpp itself.

SmolLM2-135M-Instruct with the Space's code organ (layers 10-12 trained in situ on Java/C# code,
`spaces/not-hub-transplant/organ`) grafted at its slot, exported by `not_hub.export_gguf` (llama.cpp's own converter)
to f16 and Q8_0, then run by llama.cpp through `llama-cpp-python` (built from PyPI once: pip compiles llama.cpp, about
5-10 minutes on 2 cores; pip's wheel cache keeps the build).

It reports:
- greedy continuations of a few prompts: llama.cpp on the f16 file against transformers on the float32 grafted model
  and against transformers reading the same f16 file back (same token ids in: tokenisation is compared separately);
- perplexity on the code test documents, each scored from its first token, by llama.cpp for the untouched model
  (f16), the grafted model in f16 and in Q8_0, beside transformers' float32 figures.

    .venv/bin/python benchmarks/gguf_check.py            # installs llama-cpp-python into .venv first if missing
    .venv/bin/python benchmarks/gguf_check.py --docs 8   # fewer test documents

Results: results/gguf_check.json and .md. Not a test: it needs the build and ../shared/data.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # the version whose vendored converter not_hub uses
ORGAN = HERE.parent / "spaces" / "not-hub-transplant" / "organ"
PROMPTS = [
    "public static int add(int a, int b) {",
    "public void Dispose() {",
    "for (int i = 0; i < n; i++) {",
    "The capital of France is",
]


def ensure_llama_cpp() -> float:
    """Import llama_cpp, building it with pip first if needed; return the seconds the install took (0 if present)."""
    try:
        import llama_cpp  # noqa: F401

        return 0.0
    except ImportError:
        pass
    start = time.time()
    print(f"building {LLAMA_CPP_PYTHON} (compiles llama.cpp; minutes) ...", flush=True)
    # A native build (GGML_NATIVE, the default) crashed here with a general protection fault inside libggml-cpu on a
    # VM whose CPU advertises AMX; the portable build runs everywhere. CMAKE_ARGS in the environment overrides it.
    env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", "-DGGML_NATIVE=OFF")}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-cache-dir", LLAMA_CPP_PYTHON]
    subprocess.run(cmd, check=True, env=env)
    return time.time() - start


def llama_nll(llm, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given the ids before, from llama.cpp's logits."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)  # (T, V)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-sum(logp[t - 1, ids[t]] for t in range(1, len(ids)))), len(ids) - 1


def hf_nll(model, ids: list[int]) -> tuple[float, int]:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return float(-sum(logp[t - 1, ids[t]] for t in range(1, len(ids)))), len(ids) - 1


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    out = []
    llm.reset()
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        if token == llm.token_eos() or len(out) >= n:
            break
        out.append(int(token))
    return out


def hf_greedy(model, ids: list[int], n: int, eos: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=eos)
    new = out[0, len(ids) :].tolist()
    return new[: new.index(eos)] if eos in new else new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=24, help="code test documents scored")
    parser.add_argument("--chars", type=int, default=1500, help="characters of each document")
    parser.add_argument("--new-tokens", type=int, default=24, help="greedy tokens per prompt")
    args = parser.parse_args()
    build_s = ensure_llama_cpp()
    import llama_cpp
    import torch
    from common import load_smollm2, machine, write_json, write_markdown
    from domains import DOMAINS
    from quality import held_out
    from transformers import AutoModelForCausalLM

    import not_hub

    base, tok = load_smollm2()
    grafted, _ = load_smollm2()
    organ = not_hub.OrganModel.from_pretrained(ORGAN, dtype=torch.float32)
    organ.transplant_into(grafted)
    docs = held_out(DOMAINS["code"]().test, args.docs, args.chars)
    doc_ids = [tok(d).input_ids for d in docs]
    out: dict = {"machine": machine(), "llama_cpp_python": llama_cpp.__version__, "build_s": round(build_s, 1)}
    with tempfile.TemporaryDirectory(prefix="not_hub-gguf-check-") as tmp:
        files = {
            "untouched f16": not_hub.export_gguf(base, tok, Path(tmp) / "untouched-f16.gguf", outtype="f16"),
            "grafted f16": not_hub.export_gguf(grafted, tok, Path(tmp) / "grafted-f16.gguf", outtype="f16"),
            "grafted q8_0": not_hub.export_gguf(grafted, tok, Path(tmp) / "grafted-q8_0.gguf", outtype="q8_0"),
        }
        out["file_mb"] = {k: round(p.stat().st_size / 2**20, 1) for k, p in files.items()}
        runners = {
            k: llama_cpp.Llama(str(p), n_ctx=1024, logits_all=True, verbose=False, n_threads=2, seed=0)
            for k, p in files.items()
        }
        f16_in_hf = AutoModelForCausalLM.from_pretrained(tmp, gguf_file="grafted-f16.gguf", dtype=torch.float32).eval()
        # Greedy: the same prompt token ids into both runtimes.
        greedy = []
        llm = runners["grafted f16"]
        for prompt in PROMPTS:
            ids = tok(prompt).input_ids
            cpp = llama_greedy(llm, ids, args.new_tokens)
            hf32 = hf_greedy(grafted, ids, args.new_tokens, tok.eos_token_id)
            hf16 = hf_greedy(f16_in_hf, ids, args.new_tokens, tok.eos_token_id)
            llama_tokens = llm.tokenize(prompt.encode(), add_bos=False, special=False)
            greedy.append(
                {
                    "prompt": prompt,
                    "same_tokenisation": list(llama_tokens) == ids,
                    "llama_cpp_f16": tok.decode(cpp),
                    "transformers_float32": tok.decode(hf32),
                    "transformers_f16_file": tok.decode(hf16),
                    "llama_cpp_equals_transformers_f16_file": cpp == hf16,
                    "llama_cpp_equals_transformers_float32": cpp == hf32,
                    "common_prefix_with_float32": next(
                        (i for i, (a, b) in enumerate(zip(cpp, hf32, strict=False)) if a != b),
                        min(len(cpp), len(hf32)),
                    ),
                }
            )
        out["greedy"] = greedy
        # Perplexity per document from its first token (the documents fit n_ctx: 1500 characters).
        ppl = {}
        for name, llm in runners.items():
            nll = [llama_nll(llm, ids) for ids in doc_ids]
            ppl[f"llama.cpp, {name}"] = math.exp(sum(a for a, _ in nll) / sum(n for _, n in nll))
        for name, model in (
            ("untouched float32", base),
            ("grafted float32", grafted),
            ("grafted f16 file", f16_in_hf),
        ):
            nll = [hf_nll(model, ids) for ids in doc_ids]
            ppl[f"transformers, {name}"] = math.exp(sum(a for a, _ in nll) / sum(n for _, n in nll))
        out["perplexity"] = ppl
    out["docs"], out["chars"] = len(docs), args.chars
    write_json("gguf_check", out)
    lines = [
        "### Checked by llama.cpp: SmolLM2-135M with the Space's code organ, exported to GGUF",
        "",
        f"llama-cpp-python {out['llama_cpp_python']} (llama.cpp built by pip; build {build_s:.0f} s this run), "
        f"2 threads. Files: " + ", ".join(f"{k} {v} MB" for k, v in out["file_mb"].items()) + ".",
        "",
        f"Perplexity on {len(docs)} code test documents ({args.chars} characters each, scored from the first token; "
        "the same token ids in every runtime):",
        "",
        "| runtime, model | perplexity |",
        "|---|---|",
        *[f"| {k} | {v:.3f} |" for k, v in ppl.items()],
        "",
        f"Greedy continuations ({args.new_tokens} tokens at most):",
        "",
        "| prompt | same tokens as transformers (f16 file / float32) | llama.cpp f16 | transformers float32 |",
        "|---|---|---|---|",
        *[
            f"| `{g['prompt']}` | {g['llama_cpp_equals_transformers_f16_file']} / "
            f"{g['llama_cpp_equals_transformers_float32']} | `{g['llama_cpp_f16'][:60]!r}` | "
            f"`{g['transformers_float32'][:60]!r}` |"
            for g in greedy
        ],
        "",
    ]
    write_markdown("gguf_check", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
