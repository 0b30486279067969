"""Suite-wide set-up.

On a machine without CUDA the real Triton kernels run under the Triton interpreter: TRITON_INTERPRET=1
must be set before any kernel is decorated (Triton reads it at ``@triton.jit`` time), hence here, first.
With CI=true (CI sets it) or POLAR_REQUIRE_KERNEL_TESTS=1, fail the session when no kernel test ran: a suite that
silently skipped every kernel would otherwise look green while testing only the references.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from polar_compile.testing import register_hypothesis_profiles

register_hypothesis_profiles()

_kernel_tests_passed = 0


def pytest_runtest_logreport(report):
    global _kernel_tests_passed
    if report.when == "call" and report.passed and "triton_kernel" in report.keywords:
        _kernel_tests_passed += 1


def pytest_sessionfinish(session, exitstatus):
    required = os.environ.get("POLAR_REQUIRE_KERNEL_TESTS") == "1" or os.environ.get("CI") == "true"
    if required and exitstatus == 0:
        collected_kernel_tests = any("triton_kernel" in item.keywords for item in session.items)
        if collected_kernel_tests and _kernel_tests_passed == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
            print("\nkernel tests required (CI) but no Triton kernel test passed (all skipped?)")
        elif not collected_kernel_tests and session.items:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
            print("\nkernel tests required (CI) but no test is marked triton_kernel")


@pytest.fixture
def kernel_device():
    """Device the real Triton kernels run on here ("cuda", or "cpu" under the interpreter); skips if none."""
    from polar_compile.testing import kernel_device as _kernel_device

    device = _kernel_device()
    if device is None:
        pytest.skip("no triton installed, or no CUDA and TRITON_INTERPRET!=1")
    return device


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own models: start from an empty Dynamo cache so that compiles of earlier tests
    neither count against the recompile limit (8 per code object) nor get reused."""
    yield
    torch._dynamo.reset()
