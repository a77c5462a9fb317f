"""Stop requests honoured wherever the time goes: inside sampling, and in the final grid.

A stop signal during a sample grid abandons the grid at once (the checkpoint is already written)
and the job exits with 75; grids can be switched off entirely. The end-to-end tests place the
signal with the fault seam (pipeline/faults.py: the job holds inside the grid until the signal
comes), so nothing depends on how fast the machine is.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from conftest import run_cli
from pipeline import checkpoint, faults, models, preemption
from pipeline import config as config_module
from runs import TINY, Launch, overrides

EXIT_PREEMPTED = 75


@pytest.fixture
def stop_handlers():
    previous = {signum: signal.getsignal(signum) for signum in preemption.STOP_SIGNALS}
    preemption.reset()
    preemption.install()
    yield
    preemption.reset()
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def test_a_stop_signal_abandons_sampling_at_once(stop_handlers):
    config = config_module.load(TINY, ["model.base_channels=8", "model.norm_groups=4", "model.channel_mult=[1,2]",
                                       "model.attention_resolutions=[]", "data.image_size=8"])
    torch.manual_seed(0)
    model = models.build(config.model, 8, 1).eval()
    calls = 0
    forward = model.net.forward

    def counting_forward(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the sampler runs
        return forward(*args, **kwargs)

    model.net.forward = counting_forward
    with pytest.raises(preemption.StopRequested), torch.no_grad(), preemption.interruptible():
        model.sample(2, torch.Generator().manual_seed(0), sampler="ddpm")  # 1000 network calls
    assert calls <= 4, f"sampling went on for {calls} network calls after the signal"
    assert preemption.received_signal() == signal.SIGTERM  # the trainer still stops and saves


def test_interruptible_refuses_to_start_after_a_signal(stop_handlers):
    os.kill(os.getpid(), signal.SIGUSR1)
    with pytest.raises(preemption.StopRequested):
        with preemption.interruptible():
            pytest.fail("work started after a stop signal")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_during_the_final_grid_exits_75_with_the_checkpoint(digits_dir, tmp_path, nproc):
    run_dir = tmp_path / "run"
    args = [TINY, *overrides(digits_dir, run_dir, **{"train.max_steps": 4, "sample.every_steps": 0}), "--nproc", str(nproc)]
    job = Launch(args, tmp_path / "logs", "grid", env=faults.env(hold_in_grid=True))
    job.wait_for(lambda: (run_dir / "ranks" / "held-rank-00000").exists(), "the hold inside the final grid")
    job.process.send_signal(signal.SIGTERM)
    code = job.wait()
    assert code == EXIT_PREEMPTED, job.stderr[-4000:]
    assert "the sample grid of step 4 is skipped" in job.stderr
    found = checkpoint.latest_valid(run_dir)
    assert found is not None and found[1]["step"] == 4
    assert not list((run_dir / "samples").glob("*.png"))
    # Relaunching finds the run finished.
    again = run_cli("launch", "local", *args)
    assert again.returncode == 0 and "nothing to do" in again.stderr


@pytest.mark.slow
def test_sample_grids_can_be_switched_off(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("launch", "local", TINY, *overrides(
        digits_dir, run_dir, **{"train.max_steps": 2, "sample.every_steps": 0, "sample.at_end": "false"}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (run_dir / "samples").exists() or not list((run_dir / "samples").iterdir())
    assert checkpoint.latest_valid(run_dir)[1]["step"] == 2


@pytest.mark.slow
def test_grids_during_training_and_at_the_end(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("launch", "local", TINY, *overrides(
        digits_dir, run_dir, **{"train.max_steps": 5, "sample.every_steps": 2}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == [
        f"step-{step:09d}.png" for step in (2, 4, 5)]
