"""The code passes `ruff check` with the rules in pyproject.toml ([tool.ruff]): pyflakes' undefined
names and unused imports, bugbear's loop-variable closures, import order, pyupgrade."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_ruff_check_passes():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e .[dev] (scripts/install.sh --dev)")
    done = subprocess.run([ruff, "check", "--output-format", "concise", "."], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
