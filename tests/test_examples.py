"""The scripts in examples/ run as a user runs them (a fresh process, the real SmolLM2, the CPU here), so they
cannot drift from the API they show."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(name: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=cwd, capture_output=True, text=True,
                          timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("name", ["generate_sparse.py", "torch_compile_backend.py"])
def test_decoding_examples_run_sparse(name, tmp_path):
    out = _run(name, tmp_path)
    assert "rewritten: 2 of 3 KV groups per sequence" in out, out[-2000:]
    assert "polar_compile plan for LlamaForCausalLM" in out


def test_calibration_example_writes_and_reloads_its_routers(tmp_path):
    out = _run("calibrate_own_text.py", tmp_path)
    assert (tmp_path / "my_routers.safetensors").is_file()
    assert "kept dense by optimize: (0," in out, out[-2000:]
