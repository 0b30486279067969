"""`polar-compile demo` end to end on the CPU with the shipped SmolLM2 routers."""

import pytest

from polar_compile.cli import main
from polar_compile.demo import shipped_routers_path

pytestmark = pytest.mark.slow


def test_shipped_routers_exist_and_load():
    import polar_compile

    model, _ = polar_compile.load_smollm2()
    routers = polar_compile.load_routers(shipped_routers_path(), model)  # fingerprint must match the real model
    assert routers.num_groups == 3 and routers.metadata["calibrated"]
    assert shipped_routers_path().stat().st_size < 1_000_000


def test_demo_runs_on_cpu(capsys):
    assert main(["demo", "--cpu", "--new-tokens", "6", "--prompt", "The capital of France is"]) == 0
    out = capsys.readouterr().out
    assert "token agreement" in out and "dense :" in out and "polar :" in out
    assert "rewritten: 2 of 3 KV groups" in out
