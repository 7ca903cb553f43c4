"""The command-line tool: runs, files, messages, and the module entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alphawrap import AlphaProbe, History
from alphawrap.cli import _truth_supported, main

pytest.importorskip("sklearn")

FAST = ["--steps", "4", "--batch-size", "16", "--hidden", "16"]
PNG = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_writes_history_and_figure(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = run(
        capsys, *FAST, "--curvature", "hessian,ggn", "--out", str(out)
    )
    assert code == 0, stderr
    for name in ("history.csv", "history.json", "alpha.png"):
        assert (out / name).is_file()
        assert str(out / name) in stdout
    assert (out / "alpha.png").read_bytes()[:8] == PNG
    history = History.read_json(out / "history.json")
    assert len(history) == 4 and history[0].primary == "hessian"
    assert History.read_csv(out / "history.csv") == history
    assert set(history[0].alphas) == {"hessian", "ggn"}
    assert "α* per curvature" in stdout  # the summary
    assert "Held-out accuracy:" in stdout
    assert "step 4/4" in stderr and "α*[hessian]" in stderr  # progress lines
    assert torch.get_num_threads() >= 1


def test_regression_apply_mode(tmp_path, capsys):
    code, stdout, stderr = run(
        capsys,
        *FAST,
        "--dataset",
        "regression",
        "--optimizer",
        "adam",
        "--lr",
        "0.01",
        "--mode",
        "apply",
        "--curvature",
        "ggn",
        "--curvature",
        "hessian",
        "--bounds",
        "0",
        "10",
        "--out",
        str(tmp_path),
    )
    assert code == 0, stderr
    assert "Held-out loss (MSE):" in stdout
    assert "Applied multiplier of d (4 apply-mode steps)" in stdout
    history = History.read_json(tmp_path / "history.json")
    assert [r.mode for r in history] == ["apply"] * 4
    assert history[0].primary == "ggn"
    assert all(0 <= r.applied <= 10 for r in history)


def test_cnn_float64(tmp_path, capsys):
    code, stdout, stderr = run(
        capsys,
        "--model",
        "cnn",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--dtype",
        "float64",
        "--curvature",
        "pch-abs",
        "--quiet",
        "--out",
        str(tmp_path),
    )
    assert code == 0, stderr
    assert stderr == ""
    assert "α* per curvature" not in stdout and "Held-out accuracy" in stdout
    assert len(History.read_json(tmp_path / "history.json")) == 2


@pytest.mark.skipif(not _truth_supported(), reason="AlphaProbe has no line search")
def test_truth_every_records_the_line_search(tmp_path, capsys):
    code, stdout, stderr = run(
        capsys,
        *FAST,
        "--truth-every",
        "2",
        "--curvature",
        "ggn",
        "--out",
        str(tmp_path),
    )
    assert code == 0, stderr
    history = History.read_json(tmp_path / "history.json")
    assert 1 <= sum("alpha_line" in r.extra for r in history) <= 2
    assert "line search" in stdout  # the summary's row


def test_help_explains_every_option(capsys):
    code, stdout, _ = run(capsys, "--help")
    assert code == 0
    for option in (
        "--dataset",
        "--model",
        "--optimizer",
        "--lr",
        "--momentum",
        "--curvature",
        "--mode",
        "--steps",
        "--batch-size",
        "--truth-every",
        "--seed",
        "--device",
        "--out",
        "--quiet",
    ):
        assert option in stdout
    assert "hessian,ggn,pch-clip,pch-abs" in stdout


def _bad_values(tmp_path: Path) -> list[tuple[list[str], str]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [
        (["--steps", "0"], "--steps: must be at least 1"),
        (["--steps", "many"], "expected a whole number"),
        (["--lr", "-1"], "--lr: must be a finite number greater than 0"),
        (["--lr", "nan"], "--lr"),
        (["--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
        (["--dataset", "mnist"], "invalid choice: 'mnist'"),
        (["--mode", "both"], "invalid choice: 'both'"),
        (["--curvature", "hessian,foo"], "Unknown curvature 'foo'"),
        (["--curvature", "hessian", "--curvature", "hessian"], "twice"),
        (["--curvature", "hessian,"], "empty name"),
        (["--optimizer", "adam", "--momentum", "0.5"], "--momentum applies to"),
        (["--momentum", "1"], "[0, 1)"),
        (["--truth-every", "-1"], "--truth-every: must be at least 0"),
        (["--device", "tpu"], "--device"),
        (["--model", "cnn", "--dataset", "regression"], "needs image data"),
        (["--batch-size", "5000"], "exceeds the 1347 training examples"),
        (["--bounds", "2", "1"], "LOW must not exceed HIGH"),
        (["--fallback", "sometimes"], "expected 'inner', 'skip'"),
        (["--interval", "0"], "--interval"),
        (["--out", str(a_file)], "is not a folder"),
    ]
    if not _truth_supported():
        cases.append((["--truth-every", "5"], "only 0 is accepted"))
    if torch.cuda.is_available():
        cases.append((["--device", "cuda:99"], "CUDA device(s) are visible"))
    else:
        cases.append((["--device", "cuda"], "CUDA is not available"))
    return cases


def test_bad_values_fail_before_training(tmp_path, capsys, monkeypatch):
    steps = []
    original = AlphaProbe.step

    def counting_step(self, closure=None):
        steps.append(self)
        return original(self, closure)

    monkeypatch.setattr(AlphaProbe, "step", counting_step)
    out = tmp_path / "never"
    for argv, message in _bad_values(tmp_path):
        # the case's own options come last, so they win over the defaults here
        code, stdout, stderr = run(capsys, *FAST[:2], "--out", str(out), *argv)
        assert code == 2, argv
        assert message in stderr, (argv, stderr)
        assert "alphawrap: error:" in stderr
        assert not out.exists(), argv  # nothing was written
        assert "loss " not in stderr and stdout == ""  # no progress, no summary
        assert len(steps) <= 1, argv  # at most the throw-away trial step
        steps.clear()


def test_interrupt_writes_what_was_recorded(tmp_path, capsys, monkeypatch):
    original = AlphaProbe.step

    def interrupted(self, closure=None):
        if len(self.history) == 2:
            raise KeyboardInterrupt
        return original(self, closure)

    monkeypatch.setattr(AlphaProbe, "step", interrupted)
    code, _, stderr = run(
        capsys, *FAST, "--curvature", "ggn", "--quiet", "--out", str(tmp_path)
    )
    assert code == 130
    assert "interrupted after 2 steps" in stderr
    assert len(History.read_json(tmp_path / "history.json")) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_run(tmp_path, capsys):
    code, _, stderr = run(capsys, *FAST, "--device", "cuda", "--out", str(tmp_path))
    assert code == 0, stderr
    assert len(History.read_json(tmp_path / "history.json")) == 4


def test_python_dash_m_entry_point(tmp_path):
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "alphawrap",
            *FAST[:2],
            "--steps",
            "3",
            "--curvature",
            "hessian",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Held-out accuracy" in result.stdout
    data = json.loads((tmp_path / "history.json").read_text())
    assert len(data["records"]) == 3
    assert (tmp_path / "alpha.png").read_bytes()[:8] == PNG
