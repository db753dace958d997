"""The test harness's fresh processes (tests/fixtures/warm_python.py) behave as `python -c` / `-m` / a script would:
their own environment read at import, argv, working directory, exit status, output, kill and timeout."""

import os
import signal
import subprocess
import sys

import pytest
import warm_python


def test_a_child_reads_its_own_environment_at_import(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "h")}
    code = (
        "import sys; assert not [m for m in sys.modules if m.split('.')[0] in ('huggingface_hub', 'transformers', "
        "'not_hub')], 'imported before the child took its environment'\n"
        "from huggingface_hub import constants; import os, torch\n"
        "print(constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HF_HOME, os.getcwd(), sys.argv[1:], "
        "'torch' in sys.modules, sys.path[0] == '')"
    )
    out = warm_python.run(
        [sys.executable, "-c", code, "a", "b"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(" ", 4)[:4] == ["http://127.0.0.1:9", "False", str(tmp_path / "h"), str(tmp_path)]
    assert out.stdout.rstrip().endswith("['a', 'b'] True True")
    again = warm_python.run([sys.executable, "-c", code], env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True)
    assert b" True " in again.stdout  # the next child reads its own setting, not the previous child's


@pytest.mark.parametrize(
    ("code", "returncode", "stderr"),
    [
        ("import os; os._exit(9)", 9, ""),
        ("raise SystemExit('no such organ')", 1, "no such organ"),
        ("raise SystemExit(3)", 3, ""),
        ("import sys; print('out'); print('err', file=sys.stderr); raise ValueError('boom')", 1, "ValueError: boom"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -9, ""),
    ],
)
def test_exit_status_and_output_are_those_of_a_real_process(code, returncode, stderr):
    warm = warm_python.run([sys.executable, "-c", code], capture_output=True, text=True)
    real = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert warm.returncode == real.returncode == returncode
    assert (warm.stdout, stderr in warm.stderr) == (real.stdout, stderr in real.stderr)
    assert ("Traceback" in warm.stderr) == ("Traceback" in real.stderr)


def test_modules_scripts_kill_and_timeout(tmp_path):
    out = warm_python.run([sys.executable, "-m", "json.tool", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "json.tool" in out.stdout
    script = tmp_path / "job.py"
    script.write_text("import sys, time\nprint(sys.argv[1], __name__, flush=True)\ntime.sleep(float(sys.argv[1]))\n")
    assert warm_python.run([sys.executable, str(script), "0"], capture_output=True).stdout == b"0 __main__\n"
    proc = warm_python.start([sys.executable, str(script), "60"])
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -9
    with pytest.raises(subprocess.TimeoutExpired):
        warm_python.run([sys.executable, str(script), "60"], capture_output=True, timeout=1)


def test_a_setting_torch_reads_at_import_gets_a_real_process():
    env = {**os.environ, "OMP_NUM_THREADS": "3"}
    proc = warm_python.start([sys.executable, "-c", "pass"], env=env)
    assert isinstance(proc, subprocess.Popen)
    proc.communicate(timeout=120)
