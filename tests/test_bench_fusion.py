"""benchmarks/fusion_check.py: Inductor really fuses GroupNorm with SiLU in our residual block.

The one test here that runs Inductor's code generation (about 30 s on two CPU cores); the
trainer-level compile tests use the aot_eager backend (tests/test_fast_step.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_group_norm_and_silu_become_one_kernel_forward_and_backward():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fusion_check.py")],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    kernels = done.stdout.splitlines()[1:-1]
    assert "match eager" in done.stdout.splitlines()[0]
    forward = [k for k in kernels if "group_norm" in k and "silu" in k and "backward" not in k]
    backward = [k for k in kernels if "group_norm_backward" in k and "silu_backward" in k]
    assert forward and backward, kernels


def test_bad_channel_count_is_one_line():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fusion_check.py"), "--channels", "40"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2
    assert "--channels 40: must be a positive multiple of 32" in done.stderr.strip().splitlines()[-1]
