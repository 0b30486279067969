import subprocess
import sys

import polar_compile
from polar_compile.cli import main


def test_version_and_help(capsys):
    for flag in ("--version", "--help"):
        try:
            main([flag])
        except SystemExit as done:
            assert done.code == 0
    out = capsys.readouterr().out
    assert f"polar-compile {polar_compile.__version__}" in out
    assert "usage: polar-compile" in out


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage: polar-compile" in capsys.readouterr().err


def test_import_needs_no_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # any import of triton now raises ImportError
        "import polar_compile, polar_compile.config, polar_compile.model_info, polar_compile.assets\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_public_functions_are_not_shadowed_by_submodules():
    import polar_compile.compiler
    import polar_compile.routers.calibrate

    assert callable(polar_compile.optimize) and callable(polar_compile.calibrate)
    assert polar_compile.optimize.__module__ == "polar_compile.compiler"
