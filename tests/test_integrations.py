"""The probe inside the ecosystem: Lightning, TensorBoard, GradScaler, dtypes, CUDA."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from alphawrap import AlphaProbe, ProbeRecord
from tests.cases import PROBLEMS

CURVATURES = ["hessian", "ggn", "pch-clip"]
PROBLEM = PROBLEMS[1]  # tanh MLP with cross-entropy: the curvatures differ


def make_probe(dtype=torch.float64, device="cpu", **kwargs):
    model, loss_fn, x, y = PROBLEM.make(torch.float32)
    model = model.to(device=device, dtype=dtype)
    x, y = x.to(device=device, dtype=dtype), y.to(device)
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9),
        curvature=kwargs.pop("curvature", CURVATURES),
        **kwargs,
    )

    def closure():
        probe.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return probe, model, loss_fn, x, y, closure


def assert_records_close(a, b, rel):
    for name in a.alphas:
        assert a.statuses[name] == b.statuses[name]
        assert a.curvatures[name] == pytest.approx(b.curvatures[name], rel=rel)
        if a.alphas[name] is not None:
            assert a.alphas[name] == pytest.approx(b.alphas[name], rel=rel)
    assert a.slope == pytest.approx(b.slope, rel=rel)
    assert a.loss == pytest.approx(b.loss, rel=rel)


# ------------------------------------------------------------------- Lightning
def _lightning():
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    pytest.skip("PyTorch Lightning is not installed")


def test_lightning_automatic_optimization_records_every_step(tmp_path):
    pl = _lightning()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.loss_fn, *_ = PROBLEM.make(torch.float32)
            self.probe = None

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.loss_fn(self.model(x), y)

        def configure_optimizers(self):
            self.probe = AlphaProbe(
                torch.optim.SGD(self.parameters(), lr=0.1), curvature=CURVATURES
            )
            return self.probe

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(24, PROBLEM.in_dim, generator=generator)
    y = torch.randint(0, PROBLEM.out_dim, (24,), generator=generator)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=6
    )
    module = Module()
    trainer = pl.Trainer(
        max_steps=5,  # more than one epoch of 4 batches
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    history = module.probe.history
    assert trainer.global_step == 5
    assert len(history) == 5 == module.probe.step_count
    assert [r.step for r in history] == list(range(5))
    assert all(r.loss is not None and math.isfinite(r.loss) for r in history)
    assert all(set(r.alphas) == set(CURVATURES) for r in history)


# ----------------------------------------------------------------- TensorBoard
def test_tensorboard_writes_scalars_as_records_are_made(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )
    from torch.utils.tensorboard import SummaryWriter

    from alphawrap.tensorboard import log_to_tensorboard, record_scalars

    probe, *_, closure = make_probe()
    writer = SummaryWriter(log_dir=str(tmp_path))
    remove = log_to_tensorboard(probe, writer)
    for _ in range(3):
        probe.step(closure)
    remove()
    probe.step(closure)  # after remove(): not written
    writer.close()

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "alphawrap/slope",
        "alphawrap/applied",
        "alphawrap/loss",
        "alphawrap/direction_norm",
        "alphawrap/grad_norm",
        "alphawrap/lr/0",
    }
    for name in CURVATURES:
        expected |= {
            f"alphawrap/alpha/{name}",
            f"alphawrap/curvature/{name}",
            f"alphawrap/undefined/{name}",
        }
    assert expected <= tags
    for tag in ("alphawrap/alpha/hessian", "alphawrap/curvature/ggn", "alphawrap/loss"):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [0, 1, 2]
        for s, record in zip(scalars, probe.history):
            assert s.value == pytest.approx(record_scalars(record)[tag], rel=1e-6)


def test_tensorboard_argument_checks_and_undefined_alpha():
    from alphawrap.tensorboard import log_to_tensorboard, record_scalars

    probe, *_ = make_probe()
    with pytest.raises(TypeError, match="SummaryWriter"):
        log_to_tensorboard(probe, object())
    with pytest.raises(TypeError, match="AlphaProbe"):
        log_to_tensorboard(object(), object())
    record = ProbeRecord(
        step=0,
        loss=None,
        mode="observe",
        slope=-1.0,
        direction_norm=1.0,
        grad_norm=1.0,
        curvatures={"hessian": -1.0, "ggn": 0.5},
        alphas={"hessian": None, "ggn": 2.0},
        statuses={"hessian": "nonpositive-curvature", "ggn": "ok"},
        primary="hessian",
        applied=1.0,
        action="inner",
        extra={"alpha_line": 0.7, "line_status": "ok", "blocks": {"w": 1.0}},
    )
    scalars = record_scalars(record, prefix="run1/")
    assert scalars["run1/extra/alpha_line"] == 0.7
    assert not any("line_status" in t or "blocks" in t for t in scalars)
    assert (
        "run1/alpha/hessian" not in scalars and scalars["run1/undefined/hessian"] == 1
    )
    assert scalars["run1/alpha/ggn"] == 2.0 and scalars["run1/undefined/ggn"] == 0
    assert "run1/loss" not in scalars


# ------------------------------------------------------------------- GradScaler
# BackPACK warns that the scaled loss "seems to have been modified"; the numbers
# below show the probe's unscaling makes them agree with the unscaled run.
@pytest.mark.filterwarnings("ignore:The output of CrossEntropyLoss")
def test_grad_scaler_on_the_closure_free_path():
    plain, *_, closure = make_probe(torch.float32)
    scaled, model, loss_fn, x, y, _ = make_probe(torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(3):
        plain.step(closure)
        with scaled.capture(loss_scale=scaler) as cap:
            scaled.zero_grad()
            loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            cap.loss = loss
        scaler.step(scaled)
        scaler.update()
    assert len(scaled.history) == 3
    for a, b in zip(scaled.history, plain.history):
        assert_records_close(a, b, rel=1e-4)


# ----------------------------------------------------------------------- dtypes
def test_float64_parameters_accumulate_in_float64():
    probe, model, loss_fn, x, y, closure = make_probe(torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    model.zero_grad()
    loss_fn(model(x), y).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    probe.step(closure)
    record = probe.history[-1]
    d = [p.detach() - b for p, b in zip(model.parameters(), before)]
    slope = sum(float(torch.sum(di * g)) for di, g in zip(d, grads))
    assert record.slope == pytest.approx(slope, rel=1e-12)
    assert all(isinstance(v, float) for v in record.curvatures.values())


def test_bfloat16_parameters_give_finite_float_records_close_to_float32():
    probe16, model16, *_, closure16 = make_probe(torch.bfloat16)
    probe32, model32, *_, closure32 = make_probe(torch.float32)
    with torch.no_grad():  # same (bf16-representable) starting point
        for p16, p32 in zip(model16.parameters(), model32.parameters()):
            p32.copy_(p16.float())
    assert AlphaProbe._accumulate_dtype(list(model16.parameters())) == torch.float32
    for _ in range(2):
        probe16.step(closure16)
        probe32.step(closure32)
    for r16, r32 in zip(probe16.history, probe32.history):
        numbers = [r16.loss, r16.slope, r16.direction_norm, r16.grad_norm]
        numbers += list(r16.curvatures.values())
        assert all(type(v) is float and math.isfinite(v) for v in numbers)
        assert all(type(a) is float for a in r16.alphas.values() if a is not None)
        assert_records_close(r16, r32, rel=0.1)


# ------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("mode", ["observe", "apply"])
def test_cuda_step_matches_cpu(mode):
    cpu, cpu_model, *_, cpu_closure = make_probe(torch.float64, "cpu", mode=mode)
    gpu, gpu_model, *_, gpu_closure = make_probe(torch.float64, "cuda", mode=mode)
    for _ in range(3):
        cpu.step(cpu_closure)
        gpu.step(gpu_closure)
    for a, b in zip(gpu.history, cpu.history):
        assert_records_close(a, b, rel=1e-8)
        assert a.applied == pytest.approx(b.applied, rel=1e-8)
    for p, q in zip(gpu_model.parameters(), cpu_model.parameters()):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-8, atol=1e-10)
