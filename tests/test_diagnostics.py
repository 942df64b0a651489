"""Angular-update diagnostics (docs/design.md, "Angular-update diagnostics").

Ground truth: points built by an exact rotation ``cos t y + sin t e`` (unit ``y``, unit
``e`` orthogonal to it) must give ``t``; an mpmath reference at 60 digits on the exact
float64 inputs; the first step of SGD-G / Adam-G / SGD, whose angle per row follows in
closed form from the gradient (docs/design.md, "Per-point rules"; "Why G(1,n)").
"""

import copy
import math
import os

import geoopt
import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rbn_geoopt import SGDG, AdamG, AngleMonitor, Grassmann1
from rbn_geoopt.diagnostics import point_angles

F64 = torch.float64
PROPS = settings(max_examples=int(os.environ.get("RBN_HYPOTHESIS_EXAMPLES", 50)), deadline=None)


def _rotation(n: int, t: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit ``y`` and ``cos t y + sin t e``, ``e`` unit and orthogonal to ``y``."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(n, dtype=F64, generator=gen)
    y = y / y.norm()
    e = torch.randn(n, dtype=F64, generator=gen)
    e = e - (e @ y) * y
    e = e - (e @ y) * y
    e = e / e.norm()
    return y, math.cos(t) * y + math.sin(t) * e


def _mp_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle between two float64 vectors, exactly as stored, in 60-digit arithmetic."""
    with mpmath.workdps(60):
        xs = [mpmath.mpf(v) for v in a.tolist()]
        ys = [mpmath.mpf(v) for v in b.tolist()]
        dot = mpmath.fsum(x * y for x, y in zip(xs, ys, strict=True))
        nx = mpmath.sqrt(mpmath.fsum(x * x for x in xs))
        ny = mpmath.sqrt(mpmath.fsum(y * y for y in ys))
        cross = mpmath.sqrt(max(nx * nx * ny * ny - dot * dot, 0))
        return float(mpmath.atan2(cross, dot))


# ------------------------------------------------------------------ point_angles
@PROPS
@given(
    t=st.one_of(st.floats(1e-9, math.pi), st.sampled_from([0.0, 1e-15, math.pi / 2])),
    n=st.integers(2, 40),
    seed=st.integers(0, 2**16),
    ka=st.floats(1e-150, 1e150),
    kb=st.floats(1e-150, 1e150),
    sign=st.sampled_from([1.0, -1.0]),
)
def test_a_known_rotation_gives_its_angle_at_any_scale(t, n, seed, ka, kb, sign):
    """Rotation by ``t`` -> ``t`` (vectors) and ``min(t, pi - t)`` (lines), to 1e-12, for
    any positive scales; a sign flip turns ``t`` into ``pi - t`` for vectors and changes
    nothing for lines."""
    y, z = _rotation(n, t, seed)
    a, b = ka * y, sign * kb * z
    vec = float(point_angles(a, b))
    line = float(point_angles(a, b, lines=True))
    assert vec == pytest.approx(t if sign > 0 else math.pi - t, abs=1e-12)
    assert line == pytest.approx(min(t, math.pi - t), abs=1e-12)
    assert line == pytest.approx(float(point_angles(y, z, lines=True)), abs=1e-15)
    assert 0 <= line <= math.pi / 2 and 0 <= vec <= math.pi


@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e200, 1e300])
def test_extreme_representatives_keep_their_angle(scale):
    """Points are scaled by a power of two before any norm is taken, so representatives
    whose squared norm would underflow or overflow float64 still give the angle."""
    y, z = _rotation(7, 0.3, 5)
    assert float(point_angles(scale * y, z)) == pytest.approx(0.3, abs=1e-12)
    assert float(point_angles(y, -scale * z, lines=True)) == pytest.approx(0.3, abs=1e-12)


@PROPS
@given(n=st.integers(2, 30), seed=st.integers(0, 2**16), step=st.floats(1e-12, 3.0))
def test_random_pairs_match_a_60_digit_reference(n, seed, step):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, dtype=F64, generator=gen)
    b = a + step * torch.randn(n, dtype=F64, generator=gen)
    ref = _mp_angle(a, b)
    assert float(point_angles(a, b)) == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert float(point_angles(a, b, lines=True)) == pytest.approx(
        min(ref, math.pi - ref), rel=1e-12, abs=1e-15
    )


def test_sign_flips_and_identical_points():
    y = torch.randn(6, 4, 3, dtype=F64)
    scales = torch.tensor([1.0, -1.0, 2.5, -1e-8, 3e7, -1.0], dtype=F64)[:, None, None]
    assert point_angles(y, scales * y, ndim=2, lines=True).abs().max().item() < 1e-15
    assert torch.equal(point_angles(y, y, ndim=2), torch.zeros(6, dtype=F64))
    flipped = point_angles(y, -y, ndim=2)
    torch.testing.assert_close(flipped, torch.full_like(flipped, math.pi), rtol=0, atol=1e-15)


def test_points_follow_ndim_and_agree_with_grassmann_dist():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(5, 3, 2, 2, dtype=F64, generator=gen)
    b = a + 0.3 * torch.randn(5, 3, 2, 2, dtype=F64, generator=gen)
    lines = point_angles(a, b, ndim=3, lines=True)
    assert lines.shape == (5,)
    torch.testing.assert_close(lines, Grassmann1(ndim=3).dist(a, b), rtol=1e-14, atol=0)
    rows = point_angles(a, b, ndim=1)
    assert rows.shape == (5, 3, 2)
    assert float(rows[2, 1, 0]) == pytest.approx(_mp_angle(a[2, 1, 0], b[2, 1, 0]), rel=1e-12)
    whole = point_angles(a, b, ndim=4)
    assert whole.shape == ()
    assert float(whole) == pytest.approx(_mp_angle(a.reshape(-1), b.reshape(-1)), rel=1e-12)
    # ndim = 0: every entry is a point of R^1, angle 0 (same sign) or pi (opposite sign)
    entries = point_angles(torch.tensor([1.0, -2.0]), torch.tensor([3.0, 2.0]), ndim=0)
    assert entries.tolist() == [0.0, math.pi]


def test_float32_points_are_measured_exactly_in_float64():
    a = torch.randn(4, 9)
    b = a + 1e-3 * torch.randn(4, 9)
    angles = point_angles(a, b)
    assert angles.dtype == F64
    for i in range(4):
        assert float(angles[i]) == pytest.approx(_mp_angle(a[i].double(), b[i].double()), rel=1e-12)


def test_undefined_angles_are_nan():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, math.inf], [1.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    out = point_angles(a, b)
    assert torch.isnan(out[:3]).all() and out[3] == 0


def test_point_angles_refuses_bad_input():
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*\(3, 2\)"):
        point_angles(torch.ones(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="ndim must be an int in \\[0, 2\\]"):
        point_angles(torch.ones(2, 3), torch.ones(2, 3), ndim=3)
    with pytest.raises(TypeError, match="must be tensors"):
        point_angles([1.0, 2.0], torch.ones(2))
    with pytest.raises(TypeError, match="complex"):
        point_angles(torch.ones(2, dtype=torch.complex64), torch.ones(2, dtype=torch.complex64))


# ------------------------------------------------------------------ AngleMonitor
def _rgrad_norms(w: torch.Tensor) -> torch.Tensor:
    """Per row of a G(1, n) weight: ``|h| = |r g - <yh, r g> yh|`` (design, Per-point rules)."""
    y = w.detach().double()
    r = y.norm(dim=1, keepdim=True)
    g = r * w.grad.double()
    yh = y / r
    return (g - (g * yh).sum(1, keepdim=True) * yh).norm(dim=1)


def _grassmann_weight(seed: int) -> tuple[geoopt.ManifoldParameter, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.5, 1.0, 4.0, 20.0], dtype=F64)[:, None]
    w = geoopt.ManifoldParameter(
        scales * torch.randn(4, 6, dtype=F64, generator=gen), manifold=Grassmann1()
    )
    x = 0.15 * torch.randn(6, 5, dtype=F64, generator=gen)
    return w, x


def _scale_invariant_loss(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    rows = w / w.norm(dim=1, keepdim=True)
    return torch.sin(rows @ x).sum()


def test_sgdg_first_step_angle_is_lr_times_the_clipped_gradient():
    """SGD-G, no momentum: each row turns by ``lr * min(|h|, nu)`` (the exponential map
    moves ``yh`` by ``|d|``), whatever its norm."""
    w, x = _grassmann_weight(0)
    _scale_invariant_loss(w, x).backward()
    expected = 0.2 * torch.clamp(_rgrad_norms(w), max=0.45)
    assert (expected < 0.2 * 0.45).any() and (expected == 0.2 * 0.45).any()  # both cases
    opt = SGDG([w], lr=0.2, grad_clip=0.45)
    with AngleMonitor(opt, {"w": w}).track() as report:
        opt.step()
    stats = report["params"]["w"]
    assert stats["kind"] == "grassmann" and stats["points"] == 4
    assert stats["mean"] == pytest.approx(float(expected.mean()), abs=1e-12)
    assert stats["max"] == pytest.approx(float(expected.max()), abs=1e-12)
    assert stats["whole"] is None and stats["effective_lr"] is None


def test_adamg_first_step_angle():
    """Adam-G's first step: ``|d| = lr |h^| sqrt(1 - b2) / sqrt((1 - b2) |h^|^2 + eps)``."""
    w, x = _grassmann_weight(1)
    _scale_invariant_loss(w, x).backward()
    h = _rgrad_norms(w)
    b2, eps, lr = 0.99, 1e-3, 0.05
    expected = lr * h * math.sqrt(1 - b2) / torch.sqrt((1 - b2) * h * h + eps)
    opt = AdamG([w], lr=lr, betas=(0.9, b2), eps=eps)
    with AngleMonitor(opt, {"w": w}).track() as report:
        opt.step()
    assert report["params"]["w"]["mean"] == pytest.approx(float(expected.mean()), abs=1e-12)
    assert report["params"]["w"]["max"] == pytest.approx(float(expected.max()), abs=1e-12)


def test_effective_lr_is_the_rate_sgd_turns_a_scale_invariant_row():
    """Plain SGD on a scale-invariant row ``w``: the gradient is ``gh / |w|`` (``gh`` the
    gradient at ``w / |w|``), orthogonal to ``w``, so ``tan(angle) = lr / |w|^2 * |gh|``:
    ``effective_lr = lr / |w|^2`` is exactly the rate the direction moves at."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, dtype=F64, generator=gen)
    rows = [torch.randn(1, 6, dtype=F64, generator=gen) for _ in range(3)]
    params = [torch.nn.Parameter(k * r) for k, r in zip((0.3, 1.0, 7.0), rows, strict=True)]
    unit_grads = []
    for r in rows:
        u = (r / r.norm()).requires_grad_()
        _scale_invariant_loss(u, x).backward()
        unit_grads.append(float(u.grad.norm()))
    lr = 0.5
    opt = torch.optim.SGD(params, lr=lr)
    sum(_scale_invariant_loss(p, x) for p in params).backward()
    norms = [float(p.detach().norm()) for p in params]
    with AngleMonitor(opt, [(f"w{i}", p) for i, p in enumerate(params)]).track() as report:
        opt.step()
    angles = []
    for i, (n, gh) in enumerate(zip(norms, unit_grads, strict=True)):
        stats = report["params"][f"w{i}"]
        assert stats["kind"] == "plain" and stats["points"] == 1
        assert stats["effective_lr"] == pytest.approx(lr / n**2, rel=1e-14)
        assert stats["mean"] == pytest.approx(math.atan(lr / n**2 * gh), rel=1e-12)
        assert stats["whole"] == stats["mean"]  # one row: the row is the whole weight
        angles.append(stats["mean"])
    group = report["groups"][0]
    assert group["params"] == ["w0", "w1", "w2"] and group["points"] == 3 and group["lr"] == lr
    assert group["mean"] == pytest.approx(sum(angles) / 3, rel=1e-14)
    assert group["max"] == max(angles)


def test_plain_rows_whole_weight_and_group_aggregation():
    """Rows of a plain conv weight are its output channels; a 1-d parameter is one point;
    a group's mean weighs every point equally, its max is the largest; an all-zero bias
    has no angle (NaN) and no effective lr, and counts no point."""
    gen = torch.Generator().manual_seed(4)
    conv = torch.nn.Parameter(torch.randn(3, 2, 2, 2, dtype=F64, generator=gen))
    gain = torch.nn.Parameter(torch.randn(5, dtype=F64, generator=gen))
    bias = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    lin = torch.nn.Parameter(torch.randn(2, 3, dtype=F64, generator=gen))
    opt = torch.optim.SGD([{"params": [conv, gain, bias]}, {"params": [lin], "lr": 0.01}], lr=0.1)
    for p in (conv, gain, bias, lin):
        p.grad = torch.randn(p.shape, dtype=F64, generator=gen)
    before = [p.detach().clone() for p in (conv, gain, bias, lin)]
    monitor = AngleMonitor(opt)
    with monitor.track() as report:
        opt.step()
    after = [p.detach() for p in (conv, gain, bias, lin)]
    params = report["params"]
    assert list(params) == ["group0.param0", "group0.param1", "group0.param2", "group1.param0"]
    conv_rows = [_mp_angle(before[0][i].reshape(-1), after[0][i].reshape(-1)) for i in range(3)]
    c = params["group0.param0"]
    assert c["points"] == 3
    assert c["mean"] == pytest.approx(sum(conv_rows) / 3, rel=1e-12)
    assert c["max"] == pytest.approx(max(conv_rows), rel=1e-12)
    assert c["whole"] == pytest.approx(
        _mp_angle(before[0].reshape(-1), after[0].reshape(-1)), rel=1e-12
    )
    row_sq = before[0].reshape(3, -1).norm(dim=1) ** 2
    assert c["effective_lr"] == pytest.approx(float((0.1 / row_sq).mean()), rel=1e-14)
    g = params["group0.param1"]
    assert g["points"] == 1 and g["mean"] == pytest.approx(_mp_angle(before[1], after[1]))
    assert g["effective_lr"] == pytest.approx(0.1 / float(before[1].norm()) ** 2, rel=1e-14)
    b = params["group0.param2"]
    assert b["points"] == 0 and math.isnan(b["mean"]) and math.isnan(b["max"])
    assert math.isnan(b["whole"]) and math.isnan(b["effective_lr"])
    group = report["groups"][0]
    assert group["points"] == 4 and group["lr"] == 0.1
    assert group["mean"] == pytest.approx((sum(conv_rows) + g["mean"]) / 4, rel=1e-12)
    assert group["max"] == max(c["max"], g["max"])
    assert report["groups"][1]["params"] == ["group1.param0"]
    assert report["groups"][1]["lr"] == 0.01


def _optimizers():
    def grassmann(cls, **kw):
        return lambda ps: cls(ps, **kw)

    return {
        "sgdg": grassmann(SGDG, lr=0.1, momentum=0.9, grad_clip=0.1),
        "adamg": grassmann(AdamG, lr=0.05),
        "torch-sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
        "torch-adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
        "geoopt-rsgd": lambda ps: geoopt.optim.RiemannianSGD(ps, lr=0.1, momentum=0.9),
        "geoopt-radam": lambda ps: geoopt.optim.RiemannianAdam(ps, lr=1e-2),
    }


@pytest.mark.parametrize("key", list(_optimizers()))
def test_monitoring_changes_nothing(key):
    """Three steps with the monitor around every step end bit-identical to three steps
    without it: parameters, gradients, optimizer state; the monitor does not even bump a
    tensor's version counter."""
    torch.manual_seed(0)
    manifold = geoopt.Sphere() if key.startswith("geoopt") else Grassmann1()
    point = geoopt.ManifoldParameter(
        manifold.projx(torch.randn(4, 6, dtype=F64)), manifold=manifold
    )
    plain = torch.nn.Parameter(torch.randn(3, 6, dtype=F64))
    bias = torch.nn.Parameter(torch.randn(3, dtype=F64))
    twins = [[point, plain, bias], copy.deepcopy([point, plain, bias])]
    opts = [_optimizers()[key](ps) for ps in twins]
    monitor = AngleMonitor(opts[0], {"point": point, "plain": plain, "bias": bias})
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(6, 2, dtype=F64, generator=gen)
        for (p, q, b), opt in zip(twins, opts, strict=True):
            opt.zero_grad()
            (torch.sin(p @ x).sum() + (q @ x).pow(2).sum() + b.sum()).backward()
        versions = [(p._version, p.grad._version) for p in twins[0]]
        grads = [p.grad.clone() for p in twins[0]]
        monitor.before()
        assert [(p._version, p.grad._version) for p in twins[0]] == versions
        opts[0].step()
        versions = [(p._version, p.grad._version) for p in twins[0]]
        report = monitor.after()
        assert [(p._version, p.grad._version) for p in twins[0]] == versions
        assert all(torch.equal(p.grad, g) for p, g in zip(twins[0], grads, strict=True))
        opts[1].step()
        assert report["params"]["point"]["kind"] == (
            "sphere" if key.startswith("geoopt") else "grassmann"
        )
        assert report["params"]["point"]["mean"] > 0
        assert report["params"]["plain"]["effective_lr"] > 0
    for a, b in zip(*twins, strict=True):
        assert torch.equal(a, b) and torch.equal(a.grad, b.grad)
    s0, s1 = (o.state_dict()["state"] for o in opts)
    for k in s0:
        for name in s0[k]:
            assert torch.equal(torch.as_tensor(s0[k][name]), torch.as_tensor(s1[k][name]))


def test_names_from_param_names_and_conv_points():
    """The recipe's groups carry ``param_names``; a converted conv weight is measured per
    output channel on G(1, c*kh*kw)."""
    from rbn_geoopt.nn import paper_optimizer, to_grassmann

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten()
    ).double()
    assert to_grassmann(model, all_shapes=True) == ["0.weight"]
    opt = paper_optimizer(model, "sgdg")
    monitor = AngleMonitor(opt)
    model(torch.randn(3, 2, 5, 5, dtype=F64)).pow(2).sum().backward()
    before = model[0].weight.detach().clone()
    with monitor.track() as report:
        opt.step()
    stats = report["params"]["0.weight"]
    assert stats["kind"] == "grassmann" and stats["points"] == 4 and stats["group"] == 0
    expected = Grassmann1(ndim=3).dist(before, model[0].weight.detach())
    assert stats["max"] == pytest.approx(float(expected.max()), abs=1e-14)
    assert stats["max"] <= 0.2 * 0.1 + 1e-12  # lr_g * nu, the paper's clipping
    assert set(report["params"]) == {n for n, _ in model.named_parameters()}


def test_track_disabled_and_interrupted_steps_leave_nothing():
    w = torch.nn.Parameter(torch.ones(2, 2))
    w.grad = torch.ones(2, 2)
    opt = torch.optim.SGD([w], lr=0.1)
    monitor = AngleMonitor(opt)
    with monitor.track(enabled=False) as report:
        opt.step()
    assert report == {}
    with pytest.raises(RuntimeError, match="call before"):
        monitor.after()  # nothing was snapshot
    with pytest.raises(KeyError), monitor.track() as report:
        raise KeyError("step failed")
    assert report == {}
    with pytest.raises(RuntimeError, match="call before"):
        monitor.after()


def test_monitor_refuses_bad_input():
    w = torch.nn.Parameter(torch.ones(2, 2))
    other = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    with pytest.raises(TypeError, match="param_groups"):
        AngleMonitor([w])
    with pytest.raises(ValueError, match="'other' are in no param group"):
        AngleMonitor(opt, {"w": w, "other": other})
    with pytest.raises(ValueError, match="'v' is the same tensor as 'w'"):
        AngleMonitor(opt, [("w", w), ("v", w)])
    with pytest.raises(ValueError, match="two parameters are named 'w'"):
        AngleMonitor(opt, [("w", w), ("w", other)])
    with pytest.raises(TypeError, match="params entry 0 must be a \\(name, tensor\\) pair"):
        AngleMonitor(opt, [w])
    z = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="'group0.param0' is complex"):
        AngleMonitor(torch.optim.SGD([z], lr=0.1))
