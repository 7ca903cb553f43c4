"""History exports (pandas, CSV, JSON), summary, cap, and the figure."""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys

import pytest
import torch

from alphawrap import AlphaProbe, History, ProbeRecord
from tests.cases import PROBLEMS

NAMES = ("hessian", "ggn")


def record(step: int, **changes) -> ProbeRecord:
    """A hand-made record; ``changes`` override any field."""
    fields = dict(
        step=step,
        loss=1.0 / (step + 1),
        mode="observe",
        slope=-0.5 - step,
        direction_norm=0.1 * (step + 1),
        grad_norm=2.0,
        curvatures={"hessian": 0.25 + step, "ggn": 0.5 + step},
        alphas={
            "hessian": (0.5 + step) / (0.25 + step),
            "ggn": (0.5 + step) / (0.5 + step),
        },
        statuses={"hessian": "ok", "ggn": "ok"},
        primary="hessian",
        applied=1.0,
        action="inner",
        lrs=(0.1,),
        extra={},
    )
    fields.update(changes)
    return ProbeRecord(**fields)


def edge_records() -> list[ProbeRecord]:
    """Records with every awkward value an export must keep."""
    return [
        record(0),
        record(
            1,
            alphas={"hessian": None, "ggn": 0.1 + 0.2},
            statuses={"hessian": "nonpositive-curvature", "ggn": "ok"},
            curvatures={"hessian": -1e-300, "ggn": 5e-324},
        ),
        record(
            2, loss=None, lrs=(0.1, None), extra={"alpha_line": 0.7, "note": 'a,b\n"c"'}
        ),
        record(
            3,
            loss=math.nan,
            slope=math.nan,
            direction_norm=math.inf,
            alphas={"hessian": None, "ggn": None},
            statuses={"hessian": "non-finite", "ggn": "non-finite"},
            mode="apply",
            applied=0.0,
            action="skip",
            lrs=(0.1, 0.2),
        ),
        # a record without the ggn curvature (e.g. after a change of curvatures)
        record(
            4,
            curvatures={"hessian": 2.0},
            alphas={"hessian": 1.0 / 3.0},
            statuses={"hessian": "ok"},
            mode="apply",
            applied=1.0 / 3.0,
            action="alpha",
            lrs=(),
            extra={"alpha_line": None, "nested": {"k": [1, 2.5]}},
        ),
    ]


@pytest.fixture
def edge_history() -> History:
    history = History(edge_records(), maxlen=10)
    history.dropped = 3
    return history


@pytest.fixture(scope="module")
def real_history() -> History:
    model, loss_fn, x, y = PROBLEMS[1].make(torch.float64)  # tanh, cross-entropy
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
        curvature=["hessian", "ggn", "pch-clip"],
    )

    def closure():
        probe.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    for _ in range(6):
        probe.step(closure)
    return probe.history


# ------------------------------------------------------------------ round trips
def test_json_round_trip_is_exact(tmp_path, edge_history, real_history):
    for history in (edge_history, real_history):
        path = tmp_path / "h.json"
        history.to_json(path)
        back = History.read_json(path)
        assert back == history
        assert back.maxlen == history.maxlen and back.dropped == history.dropped
        for a, b in zip(history, back):  # bit-exact floats, tuples restored
            assert a.lrs == b.lrs and type(b.lrs) is tuple
            assert repr(a.slope) == repr(b.slope)


def test_json_file_is_one_record_per_line(tmp_path, edge_history):
    path = tmp_path / "h.json"
    edge_history.to_json(path)
    data = json.loads(path.read_text())
    assert data["format"] == "alphawrap.history" and data["version"] == 1
    assert data["maxlen"] == 10 and data["dropped"] == 3
    assert len(data["records"]) == len(edge_history)
    assert len(path.read_text().splitlines()) == len(edge_history) + 2


def test_csv_round_trip_is_exact(tmp_path, edge_history, real_history):
    for history in (edge_history, real_history):
        path = tmp_path / "h.csv"
        history.to_csv(path)
        back = History.read_csv(path)
        assert back == history
        for a, b in zip(history, back):
            assert repr(a.alphas) == repr(b.alphas)  # None stays None, floats exact
            assert a.curvatures.keys() == b.curvatures.keys()
            assert a.lrs == b.lrs and a.extra == b.extra
    assert History.read_csv(path, maxlen=3).maxlen == 3


def test_csv_cells_distinguish_absent_and_undefined(tmp_path, edge_history):
    path = tmp_path / "h.csv"
    edge_history.to_csv(path)
    rows = path.read_text().splitlines()
    header = rows[0].split(",")
    assert header[:11] == [
        "step",
        "loss",
        "mode",
        "slope",
        "direction_norm",
        "grad_norm",
        "primary",
        "alpha",
        "status",
        "applied",
        "action",
    ]
    last = dict(zip(header, next(csv.reader([rows[-1]]))))
    assert last["alpha[ggn]"] == ""  # record 4 has no ggn: absent
    second = dict(zip(header, next(csv.reader([rows[2]]))))
    assert second["alpha[hessian]"] == "None"  # undefined
    assert second["alpha[ggn]"] == repr(0.1 + 0.2)


def test_equality_treats_nan_as_equal():
    a = History([record(0, loss=math.nan)])
    b = History([record(0, loss=math.nan)])
    assert a == b
    assert a != History([record(0, loss=1.0)])
    assert a != History()


def test_readers_reject_other_files(tmp_path):
    bad = tmp_path / "other.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing column"):
        History.read_csv(bad)
    bad.write_text("")
    with pytest.raises(ValueError, match="empty"):
        History.read_csv(bad)
    js = tmp_path / "other.json"
    js.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="'records'"):
        History.read_json(js)
    js.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        History.read_json(js)
    js.write_text('{"format": "alphawrap.history", "version": 99, "records": []}')
    with pytest.raises(ValueError, match="version"):
        History.read_json(js)


def test_csv_reports_the_bad_line(tmp_path, edge_history):
    path = tmp_path / "h.csv"
    edge_history.to_csv(path)
    lines = path.read_text().splitlines()
    lines[2] = "x" + lines[2][1:]  # record 1's step is no longer a number
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 3"):
        History.read_csv(path)


# ---------------------------------------------------------------------- pandas
def test_to_pandas_columns_and_values(edge_history):
    pd = pytest.importorskip("pandas")
    df = edge_history.to_pandas()
    assert len(df) == len(edge_history)
    assert list(df.columns) == edge_history.columns()
    for name in NAMES:
        for quantity in ("alpha", "cockpit_alpha", "curvature", "status"):
            assert f"{quantity}[{name}]" in df.columns
    assert {"lr[0]", "lr[1]", "extra[alpha_line]", "extra[note]"} <= set(df.columns)
    assert df["step"].dtype == "int64"
    assert df["alpha[hessian]"].dtype == "float64"
    assert math.isnan(df.loc[1, "alpha[hessian]"])
    assert df.loc[1, "status[hessian]"] == "nonpositive-curvature"
    assert pd.isna(df.loc[4, "alpha[ggn]"]) and pd.isna(df.loc[4, "status[ggn]"])
    alpha = edge_history[0].alphas["hessian"]
    assert df.loc[0, "cockpit_alpha[hessian]"] == pytest.approx(1 / alpha - 1)
    assert df.loc[0, "alpha"] == alpha and df.loc[0, "status"] == "ok"
    assert math.isnan(df.loc[2, "loss"]) and math.isnan(df.loc[2, "lr[1]"])
    assert df.loc[3, "lr[1]"] == 0.2


def test_to_pandas_matches_csv_read_by_pandas(tmp_path, real_history):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "h.csv"
    real_history.to_csv(path)
    from_csv = pd.read_csv(path)
    direct = real_history.to_pandas()
    pd.testing.assert_frame_equal(from_csv, direct, check_dtype=False)


def test_to_pandas_without_pandas_says_what_to_install(monkeypatch, edge_history):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"pip install alphawrap\[export\]"):
        edge_history.to_pandas()


def test_cockpit_convention():
    r = record(
        0,
        alphas={"hessian": 0.5, "ggn": None},
        statuses={"hessian": "ok", "ggn": "not-descent"},
    )
    assert r.cockpit_alphas == {"hessian": 1.0, "ggn": None}  # overshoot: positive


# --------------------------------------------------------------------- summary
def test_summary_reports_quartiles_and_undefined_share(real_history):
    text = real_history.summary()
    assert f"{len(real_history)} probed steps" in text
    for name in ("hessian", "ggn", "pch-clip"):
        values = sorted(
            r.alphas[name] for r in real_history if r.alphas[name] is not None
        )
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(name + " "))
        assert f"{statistics.median(values):.4g}" in line
        undefined = len(real_history) - len(values)
        assert f"({undefined}/{len(real_history)})" in line
    assert "Cap: none" in text


def test_summary_of_edge_cases(edge_history):
    text = edge_history.summary()
    lines = text.splitlines()
    hessian = next(ln for ln in lines if ln.strip().startswith("hessian "))
    assert "40.0% (2/5)" in hessian and "nonpositive-curvature 1" in hessian
    assert "non-finite 1" in hessian
    ggn = next(ln for ln in lines if ln.strip().startswith("ggn "))
    assert "(1/4)" in ggn  # record 4 has no ggn
    assert any(ln.strip().startswith("line search") for ln in lines)
    assert "Applied multiplier of d (2 apply-mode steps)" in text
    assert "alpha 1" in text and "skip 1" in text
    assert "newest 10 records are kept; 3 older records were dropped" in text
    assert "mode: observe 3, apply 2" in text


def test_summary_of_empty_history():
    text = History(maxlen=5).summary()
    assert "no records" in text and "newest 5 records" in text


def test_cap_drops_oldest_and_counts(tmp_path):
    history = History(maxlen=3)
    for step in range(5):
        history.append(record(step))
    assert [r.step for r in history] == [2, 3, 4]
    assert history.dropped == 2
    assert "2 older records were dropped" in history.summary()
    path = tmp_path / "h.json"
    history.to_json(path)
    back = History.read_json(path)
    assert back.maxlen == 3 and back.dropped == 2 and back == history
    history.clear()
    assert history.dropped == 0


def test_probe_history_size_is_the_cap():
    model, loss_fn, x, y = PROBLEMS[0].make(torch.float64)
    probe = AlphaProbe(torch.optim.SGD(model.parameters(), lr=0.1), history_size=2)

    def closure():
        probe.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        probe.step(closure)
    assert [r.step for r in probe.history] == [1, 2]
    assert probe.history.dropped == 1
    assert "1 older record was dropped" in probe.history.summary()


# ------------------------------------------------------------------------ plot
@pytest.fixture
def plt():
    pytest.importorskip("matplotlib")
    from alphawrap.report import pyplot

    plt = pyplot()
    yield plt
    plt.close("all")


def _legend(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def test_plot_returns_labelled_figure_and_writes_png(tmp_path, plt, real_history):
    from matplotlib.figure import Figure

    path = tmp_path / "alpha.png"
    fig = real_history.plot(path)
    assert isinstance(fig, Figure)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax, ax_loss = fig.axes
    assert ax.get_yscale() == "log"
    assert "α*" in ax.get_ylabel()
    assert ax_loss.get_xlabel() == "optimizer step"
    assert ax_loss.get_ylabel() == "mini-batch loss"
    labels = _legend(ax)
    for name in ("hessian", "ggn", "pch-clip"):
        assert f"α* {name}" in labels
    assert "mini-batch loss" in _legend(ax_loss)
    assert "applied multiplier" not in labels  # observe mode


def test_plot_marks_undefined_steps(plt, edge_history):
    fig = edge_history.plot()
    ax = fig.axes[0]
    labels = _legend(ax)
    assert "undefined α* hessian: 2/5 steps" in labels
    assert "undefined α* ggn: 1/4 steps" in labels
    markers = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
    assert markers["undefined α* hessian: 2/5 steps"] == [1, 3]
    assert markers["undefined α* ggn: 1/4 steps"] == [3]
    # apply mode: applied multiplier, the skipped step, and the line-search truth
    assert "applied multiplier" in labels
    assert "no step taken: 1 steps" in labels
    assert markers["α line search (truth)"] == [2]
    assert "non-finite loss: 1 steps" in _legend(fig.axes[1])
    # the undefined markers sit below every plotted value
    low = min(v for r in edge_history for v in r.alphas.values() if v)
    assert ax.get_ylim()[0] < low


def test_plot_options_and_errors(plt, edge_history):
    fig = edge_history.plot(curvatures=["ggn"], title="mine")
    assert fig.axes[0].get_title() == "mine"
    assert not any("hessian" in t for t in _legend(fig.axes[0]))
    with pytest.raises(ValueError, match="no curvature"):
        edge_history.plot(curvatures=["kfac"])
    with pytest.raises(ValueError, match="no records"):
        History().plot()


def test_plot_without_matplotlib_says_what_to_install(monkeypatch, edge_history):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install alphawrap\[plot\]"):
        edge_history.plot()
