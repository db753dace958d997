"""The four benchmark domains from ../shared/data, as documents split by document (never by position)."""

from __future__ import annotations

import json
import re

from common import DATA

from not_hub.data import DocumentSplits, load_documents, split_documents


def code() -> DocumentSplits:
    """CodeXGLUE Java/C# functions (one per document), the corpus's own train/valid/test files."""
    d = DATA / "codexglue-java-cs"

    def both(split: str) -> list[str]:
        return [f for lang in ("java", "cs") for f in load_documents(d / f"{split}.java-cs.txt.{lang}", unit="line")]

    return DocumentSplits(both("train"), both("valid"), both("test"), description={"domain": "code", "split": "given"})


def legal() -> DocumentSplits:
    """CUAD commercial contracts (one per document), split 80/10/10 by contract."""
    docs = load_documents(DATA / "cuad-contracts", unit="file", suffixes=(".txt",))
    return split_documents(docs, validation=0.1, test=0.1, seed=0, description={"domain": "legal"})


def biomedical() -> DocumentSplits:
    """PubMedQA abstracts (contexts + long answer, one per PMID), split 80/10/10 by abstract."""
    raw = json.loads((DATA / "pubmedqa" / "ori_pqal.json").read_text())
    docs = [" ".join(v["CONTEXTS"]) + " " + v.get("LONG_ANSWER", "") for v in raw.values()]
    return split_documents(docs, validation=0.1, test=0.1, seed=0, description={"domain": "biomedical"})


def general() -> DocumentSplits:
    """WikiText-2 articles: train/validation from valid.txt (split by article), test from test.txt."""

    def articles(path) -> list[str]:
        text = path.read_text()
        parts = re.split(r"\n (?== [^=].* = \n)", text)  # a new article starts with " = Title = "
        return [p.strip() for p in parts if len(p.strip()) > 200]

    wt = DATA / "wikitext-2"
    pool = split_documents(articles(wt / "valid.txt"), validation=0.2, test=0.0, seed=0)
    return DocumentSplits(
        pool.train,
        pool.validation,
        articles(wt / "test.txt"),
        description={"domain": "general", "split": "valid.txt by article; test.txt"},
    )


DOMAINS = {"code": code, "legal": legal, "biomedical": biomedical, "general": general}
