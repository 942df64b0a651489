"""orthogonality_penalty: value, gradient, and agreement with the optimizer's omega."""

from __future__ import annotations

import copy

import geoopt
import numpy as np
import pytest
import torch
import torch.nn as nn

from rbn_geoopt.manifold import Grassmann1
from rbn_geoopt.nn import orthogonality_penalty, to_grassmann
from rbn_geoopt.optim import SGDG
from rbn_geoopt.orthogonality import orthogonality_egrad
from tests import models as M

torch.set_num_threads(1)


def grassmann_param(shape, seed=0, unit=False):
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(shape, generator=gen, dtype=torch.float64)
    if unit:
        flat = data.reshape(shape[0], -1)
        data = (flat / flat.norm(dim=1, keepdim=True)).reshape(shape)
    return geoopt.ManifoldParameter(data, manifold=Grassmann1(ndim=len(shape) - 1))


def numpy_penalty(arrays, omega):
    total = 0.0
    for a in arrays:
        y = np.asarray(a, dtype=np.float64).reshape(a.shape[0], -1)
        yh = y / np.linalg.norm(y, axis=1, keepdims=True)
        total += np.sum((yh @ yh.T - np.eye(y.shape[0])) ** 2)
    return omega / 2 * total


@pytest.mark.parametrize("shape", [(5, 3, 2, 2), (4, 9), (7, 3)])
def test_value_matches_numpy(shape):
    p = grassmann_param(shape)
    got = orthogonality_penalty([p], omega=0.3).item()
    assert got == pytest.approx(numpy_penalty([p.detach().numpy()], 0.3), rel=1e-13)


def test_scale_invariant_and_zero_on_orthonormal_rows():
    p = grassmann_param((4, 3, 3))
    scales = torch.tensor([0.1, 3.0, 7.0, 0.5], dtype=torch.float64).reshape(4, 1, 1)
    q = geoopt.ManifoldParameter(p.detach() * scales, manifold=Grassmann1(ndim=2))
    torch.testing.assert_close(
        orthogonality_penalty(p), orthogonality_penalty(q), rtol=1e-13, atol=0
    )
    gen = torch.Generator().manual_seed(2)
    qr, _ = torch.linalg.qr(torch.randn(9, 4, generator=gen, dtype=torch.float64))
    ortho = geoopt.ManifoldParameter(qr.T.reshape(4, 3, 3) * 5, manifold=Grassmann1(ndim=2))
    assert orthogonality_penalty(ortho, omega=1.0).item() < 1e-28


def test_gradient_is_projected_paper_formula_at_unit_rows():
    p = grassmann_param((5, 12), unit=True)
    omega = 0.1
    orthogonality_penalty([p], omega).backward()
    y = p.detach()
    paper = 2 * omega * (y @ y.T @ y - y)  # the paper's gradient, at unit rows
    projected = paper - (paper * y).sum(1, keepdim=True) * y
    torch.testing.assert_close(p.grad, projected, rtol=1e-12, atol=1e-14)


def test_gradient_equals_optimizer_helper_at_any_scale():
    p = grassmann_param((6, 2, 3, 3))
    orthogonality_penalty([p], 0.25).backward()
    expected = orthogonality_egrad(p.detach(), 3, 0.25)
    torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=1e-14)


def test_loss_term_gives_the_same_steps_as_optimizer_omega():
    torch.manual_seed(0)
    model = M.MLP().double()
    to_grassmann(model)
    twin = copy.deepcopy(model)
    g1 = [p for p in model.parameters() if hasattr(p, "manifold")]
    g2 = [p for p in twin.parameters() if hasattr(p, "manifold")]
    opt1 = SGDG([{"params": g1, "omega": 0.1}], lr=0.2, momentum=0.9)
    opt2 = SGDG([{"params": g2, "omega": 0.0}], lr=0.2, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(16, 20, generator=gen, dtype=torch.float64)
        for net, opt, omega in ((model, opt1, 0.0), (twin, opt2, 0.1)):
            opt.zero_grad()
            loss = net(x).square().mean() + orthogonality_penalty(net, omega)
            loss.backward()
            opt.step()
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_inputs():
    model = M.MLP()
    assert orthogonality_penalty(model).item() == 0.0  # nothing on Grassmann1 yet
    to_grassmann(model)
    ps = [model.fc1.weight, model.fc2.weight]
    torch.testing.assert_close(orthogonality_penalty(model), orthogonality_penalty(ps))
    torch.testing.assert_close(
        orthogonality_penalty(model),
        orthogonality_penalty(model.fc1.weight) + orthogonality_penalty(model.fc2.weight),
    )
    assert orthogonality_penalty([]).item() == 0.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="omega"):
            orthogonality_penalty(model, bad)
    with pytest.raises(TypeError, match="omega"):
        orthogonality_penalty(model, "0.1")
    with pytest.raises(TypeError, match="tensors"):
        orthogonality_penalty([model.fc1.weight, 3.0])
    with pytest.raises(TypeError, match="module, a tensor"):
        orthogonality_penalty(3.0)
    assert isinstance(model, nn.Module)


def test_fsdp2_parameters_are_refused_not_silently_zero(tmp_path):
    """FSDP2 turns parameters into DTensors without a manifold: refuse, never return 0."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch built without distributed/gloo support")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(0)]))
        with pytest.raises(TypeError, match="DTensor.*omega"):
            orthogonality_penalty([sharded], omega=0.1)
    finally:
        dist.destroy_process_group()
