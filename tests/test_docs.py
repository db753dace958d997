"""Every code block of README.md and docs/*.md runs (tests/fixtures/run_docs.py), so the docs cannot go stale.

One subprocess runs them all, against the local Hub server and a tiny stand-in for SmolLM2 (fresh HF_HOME, the
endpoint read at import); a failure names each failing block's file, line and traceback.
"""

import json
import os
import sys
from pathlib import Path

import warm_python
from hub_server import LocalHub

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from run_docs import code_blocks  # noqa: E402


def test_every_code_block_of_the_readme_and_the_docs_runs(tmp_path):
    tmp = tmp_path
    hub = LocalHub().start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp / "hf"), HF_TOKEN="hf_docs", HF_HUB_DISABLE_TELEMETRY="1")
        env["NOT_HUB_CACHE"] = str(tmp / "not_hub_cache")
        script = Path(__file__).parent / "fixtures" / "run_docs.py"
        out = warm_python.run(
            [sys.executable, str(script), str(tmp / "result.json"), str(tmp / "work"), *map(str, DOCS)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        hub.stop()
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads((tmp / "result.json").read_text())
    failed = [(Path(doc).name, r) for doc, ran in results.items() for r in ran if not r["ok"]]
    assert not failed, "\n\n".join(f"{name}, block at line {r['line']}:\n{r['error']}" for name, r in failed)
    for doc in DOCS:  # every block ran, none skipped
        expected = [(line, lang) for lang, _, line in code_blocks(doc) if lang in ("python", "bash")]
        assert [(r["line"], r["lang"]) for r in results[str(doc)]] == expected, doc.name


def test_the_docs_have_code_and_every_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in DOCS[1:]:
        assert f"docs/{page.name}" in readme, f"README does not link {page.name}"
    assert sum(1 for doc in DOCS for lang, _, _ in code_blocks(doc) if lang == "python") >= 8
