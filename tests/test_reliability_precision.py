"""Half precision and long runs: points stay finite, unit and their momentum tangent.

* bfloat16 / float16 parameters and ``torch.autocast("cpu", dtype=torch.bfloat16)``
  training of a BatchNorm net: finite, rows unit to the storage precision, float32 state
  tangent at the stored point, and the net learns;
* 20,000 float32 steps with random gradients: rows unit to 1e-5 and momentum tangent to
  1e-5 without any user call (no ``stabilize``).
"""

from __future__ import annotations

import geoopt
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rbn_geoopt import Grassmann1
from rbn_geoopt.nn import to_grassmann
from rbn_geoopt.optim import SGDG, AdamG

#: |row norm - 1| a stored point may show: its rounding (8 / 11 significant bits)
UNIT_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads would only contend for the cores (10-50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().reshape(t.shape[0], -1)


def _tangent_error(y: torch.Tensor, m: torch.Tensor) -> float:
    """max over rows of |<y, m>| / (|y| |m|): 0 for a tangent (horizontal) vector."""
    y, m = _rows(y), _rows(m)
    cos = (y * m).sum(dim=1).abs() / (y.norm(dim=1) * m.norm(dim=1)).clamp_min(1e-30)
    return cos.max().item()


def _unit_error(y: torch.Tensor) -> float:
    return (_rows(y).norm(dim=1) - 1).abs().max().item()


def _tangent_key(opt) -> str:
    return "momentum_buffer" if isinstance(opt, SGDG) else "exp_avg"


# --------------------------------------------------------------------- half precision
def _data():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 10, generator=gen) * 2
    labels = torch.randint(0, 3, (96,), generator=gen)
    return centers[labels] + torch.randn(96, 10, generator=gen), labels


def _net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():  # unit rows, as in the paper (to_grassmann keeps rows as they are)
        net[0].weight.copy_(F.normalize(net[0].weight, dim=1))
    # the Linear's input rank is not in the graph: the 2-D example input decides it
    assert to_grassmann(net, example_inputs=torch.zeros(4, 10)) == ["0.weight"]
    return net.to(dtype)


def _optimizer(net: nn.Module, cls):
    w = net[0].weight
    rest = [p for p in net.parameters() if p is not w]
    g_hyper = {"lr": 0.2, "momentum": 0.9} if cls is SGDG else {"lr": 0.05}
    return cls(
        [
            {"params": [w], "grad_clip": 0.1, "omega": 0.1, **g_hyper},
            {"params": rest, "lr": 0.05, "momentum": 0.9, "nesterov": True},
        ],
        lr=0.05,
        euclidean="sgd",
    )


MODES = [
    ("bf16-params", torch.bfloat16, False),
    ("fp16-params", torch.float16, False),
    ("autocast-bf16", torch.float32, True),
]


@pytest.mark.parametrize("cls", [SGDG, AdamG])
@pytest.mark.parametrize("mode, dtype, autocast", MODES, ids=[m[0] for m in MODES])
def test_half_precision_training_stays_finite_unit_tangent_and_learns(mode, dtype, autocast, cls):
    x, y = _data()
    net = _net(dtype)
    opt = _optimizer(net, cls)
    w = net[0].weight
    losses = []
    for _ in range(120):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = net(x.to(dtype))
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert w.dtype == dtype and torch.isfinite(w).all()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert _unit_error(w) <= UNIT_TOL[dtype], _unit_error(w)
    state = opt.state[w][_tangent_key(opt)]
    assert state.dtype == torch.float32  # math and state in float32
    assert _tangent_error(w, state) <= 1e-5  # tangent at the point actually stored
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0], (losses[0], losses[-10:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_half_precision_random_gradients_2000_steps_no_drift(dtype, cls):
    gen = torch.Generator().manual_seed(1)
    start = Grassmann1().projx(torch.randn(4, 8, generator=gen))
    w = geoopt.ManifoldParameter(start.to(dtype), manifold=Grassmann1())
    hyper = {"lr": 0.2, "momentum": 0.9} if cls is SGDG else {"lr": 0.05}
    opt = cls([w], **hyper)
    grads = torch.randn(2000, 4, 8, generator=gen).to(dtype)
    worst_unit = worst_tangent = 0.0
    for k in range(2000):
        w.grad = grads[k]
        opt.step()
        if k % 100 == 99:
            worst_unit = max(worst_unit, _unit_error(w))
            worst_tangent = max(worst_tangent, _tangent_error(w, opt.state[w][_tangent_key(opt)]))
    assert worst_unit <= UNIT_TOL[dtype] and worst_tangent <= 1e-5, (worst_unit, worst_tangent)


# ------------------------------------------------------------------------ long runs
@pytest.mark.slow
@pytest.mark.parametrize("cls", [SGDG, AdamG])
@pytest.mark.parametrize("start", ["unit", "non-unit"])
def test_20000_float32_steps_keep_each_norm_and_momentum_tangent(cls, start):
    """The paper's hyper-parameters (clipping on), conv-shaped points. Unit rows stay unit
    to float32 rounding (they are written back at norm 1); other rows keep their norm up to
    a slow random walk of the rounding."""
    gen = torch.Generator().manual_seed(2)
    data = torch.randn(4, 2, 2, 2, generator=gen) * 5
    if start == "unit":
        data = data / data.flatten(1).norm(dim=1).view(4, 1, 1, 1)
    norms = data.flatten(1).norm(dim=1)
    w = geoopt.ManifoldParameter(data, Grassmann1(ndim=3))
    hyper = {"lr": 0.2, "momentum": 0.9} if cls is SGDG else {"lr": 0.05}
    opt = cls([w], grad_clip=0.1, **hyper)
    steps = 20_000
    grads = torch.randn(steps, 4, 2, 2, 2, generator=gen)
    worst_norm = worst_tangent = 0.0
    for k in range(steps):
        w.grad = grads[k]
        opt.step()
        if k % 2000 == 1999:
            drift = (w.detach().flatten(1).norm(dim=1) / norms - 1).abs().max().item()
            worst_norm = max(worst_norm, drift)
            worst_tangent = max(worst_tangent, _tangent_error(w, opt.state[w][_tangent_key(opt)]))
    drift, tangent = f"{worst_norm:.2e}", f"{worst_tangent:.2e}"
    print(f"{cls.__name__} {start}: 20k steps, norm drift {drift}, tangent {tangent}")
    assert worst_norm <= (1e-6 if start == "unit" else 1e-4), worst_norm
    assert worst_tangent <= 1e-5, worst_tangent
    assert opt.param_groups[0]["step"] == steps and w.dtype == torch.float32
