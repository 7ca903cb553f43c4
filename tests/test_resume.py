"""A run resumed from a checkpoint in a fresh process is bitwise the same run.

Issue 4, point 4: stop after ``k`` steps, ``torch.save`` the model, the probe and
the LR scheduler, load them in a new Python process with
``torch.load(weights_only=True)`` and continue. Parameters, inner state, the
schedule and the history (records as plain values) equal those of a run that
never stopped, bit for bit, in observe and apply mode, with and without StepLR.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests import _resume_worker as worker
from tests._state import same_bits

ROOT = Path(__file__).resolve().parents[1]


def _check_coverage(name: str, t: worker.Training) -> None:
    """The configs exercise what the test claims: α applied, LR scheduled."""
    history = t.probe.history
    assert len(history) >= 3
    if t.probe.mode == "apply":
        assert any(r.action == "alpha" for r in history), name
    if t.scheduler is not None:
        assert len({r.lrs for r in history}) > 1, name
    if history.maxlen is not None:
        assert history.dropped > 0, name


def test_resume_in_a_fresh_process_is_bitwise_identical(tmp_path):
    names = list(worker.CONFIGS)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    # Start the fresh process now: it imports torch while this one trains, then
    # waits on stdin for the checkpoints.
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "_resume_worker.py")],
        stdin=subprocess.PIPE,
        cwd=ROOT,
        env=env,
        text=True,
    )
    try:
        expected = {}
        for name in names:
            uninterrupted = worker.build(name)
            worker.train(uninterrupted, 0, worker.TOTAL_STEPS)
            expected[name] = worker.result(uninterrupted)
            _check_coverage(name, uninterrupted)

            first_part = worker.build(name)
            worker.train(first_part, 0, worker.STOP_AFTER)
            worker.save(first_part, tmp_path / f"{name}.pt")
        process.communicate(" ".join([str(tmp_path), *names]) + "\n", timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0

    for name in names:
        resumed = torch.load(tmp_path / f"{name}.out.pt", weights_only=True)
        want = expected[name]
        assert same_bits(resumed["params"], want["params"]), name
        assert same_bits(resumed["probe"], want["probe"]), name
        assert resumed["lrs"] == want["lrs"], name
