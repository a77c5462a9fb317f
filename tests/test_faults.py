"""The fault seam: parsed once from one variable, typos refused, holds bounded."""

from __future__ import annotations

import pytest

from pipeline import faults
from pipeline.faults import Faults


def test_parse_every_fault():
    plan = Faults.parse("fail_at_step=5; nan_at_steps=3,4;pause_in_save=6;hold_after_step=7;hold_in_grid=1;"
                        "compile_backend=aot_eager")
    assert plan == Faults(fail_at_step=5, nan_at_steps=frozenset({3, 4}), pause_in_save=6, hold_after_step=7,
                          hold_in_grid=True, compile_backend="aot_eager")
    assert Faults.parse("") == Faults()


def test_unknown_fault_is_refused():
    with pytest.raises(ValueError, match="unknown fault 'fail_at'"):
        Faults.parse("fail_at=3")
    with pytest.raises(ValueError):
        faults.env(hold_after=3)


def test_env_round_trips():
    assert Faults.parse(faults.env(nan_at_steps=range(3, 6), hold_in_grid=True)[faults.ENV]) == Faults(
        nan_at_steps=frozenset({3, 4, 5}), hold_in_grid=True)


def test_fail_and_nan_points():
    plan = Faults(fail_at_step=2, nan_at_steps=frozenset({3}))
    plan.before_step(1)
    with pytest.raises(RuntimeError, match="injected failure"):
        plan.before_step(2)
    assert plan.nan_loss(0, 3) and not plan.nan_loss(1, 3) and not plan.nan_loss(0, 2)


def test_a_hold_ends_with_the_stop_signal_and_removes_its_marker(tmp_path):
    answers = iter([False, False, True])
    faults.hold("after step 1", tmp_path, 0, lambda: next(answers))
    assert not (tmp_path / "ranks" / "held-rank-00000").exists()


def test_a_hold_without_a_signal_ends_with_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(faults, "HOLD_LIMIT_S", 0.0)
    with pytest.raises(RuntimeError, match="no stop signal came"):
        faults.hold("after step 1", tmp_path, 0, lambda: False)
