"""polar_compile/ops/__init__.py: one import registers every polar:: op; ``import polar_compile`` registers none."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

OPS_DIR = Path(__file__).resolve().parents[2] / "polar_compile" / "ops"

_LIST_OPS = """
import sys, torch
{imports}
print(" ".join(sorted(name for name in dir(torch.ops.polar) if not name.startswith("_") and name != "name")))
print("triton" in sys.modules)
"""


def _registered_after(imports: str) -> tuple[set[str], bool]:
    """The torch.ops.polar names, and whether triton got imported, in a fresh process after ``imports``."""
    result = subprocess.run(
        [sys.executable, "-c", _LIST_OPS.format(imports=imports)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    names, triton_loaded = result.stdout.splitlines()[-2:]
    return set(names.split()), triton_loaded == "True"


def _ops_defined_in_the_op_files() -> set[str]:
    found = set()
    for path in OPS_DIR.glob("*.py"):
        found |= set(re.findall(r"""(?:_register|custom_op)\(\s*["']polar::(\w+)["']""", path.read_text()))
    return found


def test_importing_polar_compile_ops_registers_every_op_an_op_file_defines():
    defined = _ops_defined_in_the_op_files()
    issue_ops = {"selective_attention", "selective_up", "selective_gated_up", "selective_down", "batch_union_topk"}
    assert issue_ops <= defined, "the scan of the op files missed an op: the check would be vacuous"
    registered, _ = _registered_after("import polar_compile.ops")
    assert registered == defined, f"not registered by `import polar_compile.ops`: {sorted(defined - registered)}"


def test_importing_polar_compile_alone_registers_no_op_and_imports_no_triton():
    registered, triton_loaded = _registered_after("import polar_compile")
    assert registered == set()
    assert not triton_loaded
