"""Organs over real HTTP: the huggingface_hub client against the local Hub-protocol server (tests/fixtures).

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import, so each scenario runs in a fresh process
with its environment set; the server runs in this process on 127.0.0.1.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hub_server import LocalHub

SCENARIO_PRELUDE = """
import sys, torch, copy
sys.path.insert(0, {fixtures!r})
import not_hub
from tiny_models import tiny_model, tiny_input_ids
"""


@pytest.fixture(params=[False, True], ids=["regular-upload", "lfs-upload"])
def hub(request):
    server = LocalHub(lfs=request.param).start()
    yield server
    server.stop()


def run_scenario(hub, tmp_path: Path, code: str, *, xet: bool = False, offline: bool = False) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(tmp_path / "hf_home"),
        HF_TOKEN="test-token",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    if not xet:
        env["HF_HUB_DISABLE_XET"] = "1"
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    fixtures = str(Path(__file__).parent / "fixtures")
    script = SCENARIO_PRELUDE.format(fixtures=fixtures) + textwrap.dedent(code)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_push_then_load_by_repo_id_revision_and_offline(hub, tmp_path):
    xet = not hub.state.lfs  # regular uploads must work with hf_xet active; LFS needs Xet disabled
    run_scenario(
        hub,
        tmp_path,
        """
        donor = tiny_model("llama")
        organ = not_hub.extract_organ(donor, layer_range=(1, 3), base_model="org/tiny-llama")
        url = organ.push_to_hub("user/tiny-organ")
        assert "/commit/" in url, url
        loaded = not_hub.OrganModel.from_pretrained("user/tiny-organ")
        for k, v in organ.state_dict().items():
            assert torch.equal(v, loaded.state_dict()[k]), k
        # A second organ on a branch: the organ's revision, not the donor's.
        other = not_hub.extract_organ(donor, layer_range=(3, 5), base_model="org/tiny-llama")
        other.push_to_hub("user/tiny-organ", revision="v2")
        assert not_hub.OrganModel.from_pretrained("user/tiny-organ", revision="v2").config.layer_range == (3, 5)
        assert not_hub.OrganModel.from_pretrained("user/tiny-organ").config.layer_range == (1, 3)
        from transformers import AutoModel
        assert isinstance(AutoModel.from_pretrained("user/tiny-organ"), not_hub.OrganModel)
        rec = loaded.transplant_into(donor, position=0)
        assert donor.config.transplants[0]["organ"] == "user/tiny-organ"
        print("OK")
    """,
        xet=xet,
    )
    assert bool(hub.state.lfs_objects) == hub.state.lfs  # the weights really took the LFS path when asked to
    # Offline: served from the cache the first process filled.
    out = run_scenario(
        hub,
        tmp_path,
        """
        organ = not_hub.OrganModel.from_pretrained("user/tiny-organ")
        assert organ.config.layer_range == (1, 3)
        try:
            not_hub.OrganModel.from_pretrained("user/never-downloaded")
        except not_hub.errors.OrganNotFoundError as err:
            assert "user/never-downloaded" in str(err) and "not-hub pull" in str(err), err
        print("OFFLINE-OK")
    """,
        offline=True,
    )
    assert "OFFLINE-OK" in out


def test_unknown_repo_revision_and_tampered_download(hub, tmp_path):
    run_scenario(
        hub,
        tmp_path,
        """
        not_hub.extract_organ(tiny_model("llama"), layer_range=(1, 3)).push_to_hub("user/organ")
        print("pushed")
    """,
    )
    blob = hub.state.repos["user/organ"].commits[hub.state.repos["user/organ"].branches["main"]]["model.safetensors"]
    altered = bytearray(blob)
    altered[-1] ^= 1
    hub.state.tamper[("user/organ", "model.safetensors")] = bytes(altered)
    run_scenario(
        hub,
        tmp_path,
        """
        from not_hub.errors import IntegrityError, OrganNotFoundError
        for repo, rev, expected in [("user/missing", None, "was not found"), ("user/organ", "nope", "no revision")]:
            try:
                not_hub.OrganModel.from_pretrained(repo, revision=rev)
                raise SystemExit(f"{repo}@{rev} loaded")
            except OrganNotFoundError as err:
                assert expected in str(err), err
        try:
            not_hub.OrganModel.from_pretrained("user/organ")
            raise SystemExit("tampered download loaded")
        except IntegrityError as err:
            assert "sha256" in str(err), err
        print("OK")
    """,
    )
