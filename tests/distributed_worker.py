"""One rank of the 2-process gloo runs behind tests/test_distributed.py (not a test module).

Run as ``python -m tests.distributed_worker OUTDIR`` with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set. It trains the same small BatchNorm model, whose
conv/linear weights ``to_grassmann`` put on G(1, n), under DistributedDataParallel and under
FSDP2 ``fully_shard`` with SGD-G and Adam-G, and writes ``OUTDIR/rank{R}.pt``: the full
(gathered) parameters and optimizer state per scenario, plus the outcome of the bad-input
scenarios. The test compares them with single-process runs (``reference_run``) that feed
each rank's half batch through the model separately, exactly the gradient DDP and FSDP
average (BatchNorm statistics are per rank: SyncBatchNorm needs a GPU).

Model builders, data and optimizer configurations live here so that the test and the
workers share them.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.nn as nn
import torch.nn.functional as F

from rbn_geoopt import Grassmann1
from rbn_geoopt.nn import to_grassmann
from rbn_geoopt.optim import SGDG, AdamG

WORLD = 2
BATCH = 16  # 8 rows per rank
STEPS = 6
GRASSMANN = {"conv.weight": 3, "fc1.weight": 1, "fc2.weight": 1}  # name -> point ndim


class Net(nn.Module):
    """conv (5 rows: shards 3 + 2) -> BN -> fc1 (3 rows: 2 + 1) -> BN -> fc2 (1 row: 1 + 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(5)
        self.fc1 = nn.Linear(5, 3)
        self.bn2 = nn.BatchNorm1d(3)
        self.fc2 = nn.Linear(3, 1)
        self.bn3 = nn.BatchNorm1d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv(x))).mean(dim=(2, 3))
        h = F.relu(self.bn2(self.fc1(h)))
        return self.bn3(self.fc2(h))


def make_model() -> Net:
    torch.manual_seed(0)
    net = Net().double()
    converted = to_grassmann(net)
    assert sorted(converted) == sorted(GRASSMANN), converted
    with torch.no_grad():  # non-trivial BN affine parameters
        for bn in (net.bn1, net.bn2, net.bn3):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net


def make_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randn(BATCH, 1, generator=g, dtype=torch.float64)
    return x, y


def half(t: torch.Tensor, rank: int) -> torch.Tensor:
    n = t.shape[0] // WORLD
    return t[rank * n : (rank + 1) * n]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y)


def param_groups(model: nn.Module, method: str) -> list[dict]:
    """The paper's recipe, with the manifold given per group (FSDP2 loses p.manifold)."""
    named = dict(model.named_parameters())
    lr_g = 0.2 if method == "sgdg" else 0.05
    hyper_g = {"lr": lr_g, "grad_clip": 0.1, "omega": 0.1}
    if method == "sgdg":
        hyper_g["momentum"] = 0.9
    groups = [
        {"params": [(n, named[n]) for n, d in GRASSMANN.items() if d == ndim], **hyper_g}
        | {"manifold": Grassmann1(ndim=ndim)}
        for ndim in (3, 1)
    ]
    rest = [(n, p) for n, p in named.items() if n not in GRASSMANN]
    groups.append(
        {
            "params": rest,
            "lr": 0.01,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 5e-4,
            "euclidean": "sgd",
        }
    )
    return groups


def make_optimizer(model: nn.Module, method: str):
    cls = SGDG if method == "sgdg" else AdamG
    return cls(param_groups(model, method), lr=0.01)


def reference_run(method: str, steps: int = STEPS) -> tuple[Net, torch.optim.Optimizer]:
    """Single process: each step's gradient is the mean over the two per-rank half batches."""
    model = make_model()
    opt = make_optimizer(model, method)
    for step in range(steps):
        x, y = make_data(step)
        opt.zero_grad()
        loss = sum(loss_fn(model(half(x, r)), half(y, r)) for r in range(WORLD)) / WORLD
        loss.backward()
        opt.step()
    return model, opt


def state_keys(method: str) -> tuple[str, ...]:
    return ("momentum_buffer",) if method == "sgdg" else ("exp_avg", "exp_avg_sq", "step")


def _full(t):
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return t.full_tensor().detach().clone()
    return torch.as_tensor(t).detach().clone()


def snapshot(model: nn.Module, opt, method: str) -> dict:
    """Full parameters and the Grassmann1 parameters' optimizer state, by name."""
    named = dict(model.named_parameters())
    params = {n: _full(p) for n, p in named.items()}
    state = {n: {k: _full(opt.state[named[n]][k]) for k in state_keys(method)} for n in GRASSMANN}
    return {"params": params, "state": state}


# ------------------------------------------------------------------------- scenarios
def _train(model, opt, rank: int, steps: range) -> None:
    for step in steps:
        x, y = make_data(step)
        opt.zero_grad()
        loss_fn(model(half(x, rank)), half(y, rank)).backward()
        opt.step()


def run_ddp(rank: int, method: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = make_model()
    ddp = DistributedDataParallel(model)
    opt = make_optimizer(model, method)
    _train(ddp, opt, rank, range(STEPS))
    return snapshot(model, opt, method)


def _sharded_model() -> Net:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for module in (model.conv, model.fc1, model.fc2):
        fully_shard(module)
    fully_shard(model)
    return model


def run_fsdp(rank: int, method: str) -> dict:
    from torch.distributed.tensor import DTensor

    model = _sharded_model()
    named = dict(model.named_parameters())
    layout = {
        n: (type(p).__name__, isinstance(p, DTensor), tuple(p.to_local().shape))
        for n, p in named.items()
    }
    opt = make_optimizer(model, method)
    _train(model, opt, rank, range(STEPS))
    out = snapshot(model, opt, method)
    out["layout"] = layout
    out["state_is_dtensor"] = {
        n: {k: isinstance(opt.state[named[n]][k], DTensor) for k in state_keys(method)}
        for n in GRASSMANN
    }
    return out


def run_fsdp_checkpoint(rank: int, outdir: str, method: str) -> dict:
    """DCP save after 3 steps, 3 more steps; a fresh sharded model + optimizer loads the
    checkpoint and takes the same 3 steps: both must agree bit for bit.

    The fresh optimizer's state dict is requested only after the model weights are loaded,
    so torch's ``_init_optim_state`` runs its ``lr = 0`` step on the loaded weights: that
    step must not change a bit of them.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = _sharded_model()
    opt = make_optimizer(model, method)
    _train(model, opt, rank, range(3))
    model_sd, optim_sd = get_state_dict(model, opt)
    path = os.path.join(outdir, f"dcp_{method}")
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    _train(model, opt, rank, range(3, 6))
    first = snapshot(model, opt, method)

    model2 = _sharded_model()
    opt2 = make_optimizer(model2, method)
    loaded = {"model": get_model_state_dict(model2)}
    dcp.load(loaded, checkpoint_id=path)
    set_model_state_dict(model2, loaded["model"])
    loaded = {"optim": get_optimizer_state_dict(model2, opt2)}  # lr = 0 step happens here
    dcp.load(loaded, checkpoint_id=path)
    set_optimizer_state_dict(model2, opt2, loaded["optim"])
    _train(model2, opt2, rank, range(3, 6))
    second = snapshot(model2, opt2, method)
    return {"first": first, "second": second}


def run_fsdp_nonfinite_shard(rank: int) -> dict:
    """NaN in rank 1's shard of one gradient: both ranks raise, nothing changes."""
    from rbn_geoopt.optim import NonFiniteGradientError

    method = "sgdg"
    model = _sharded_model()
    opt = make_optimizer(model, method)
    _train(model, opt, rank, range(2))
    before = snapshot(model, opt, method)
    x, y = make_data(2)
    opt.zero_grad()
    loss_fn(model(half(x, rank)), half(y, rank)).backward()
    if rank == 1:
        model.conv.weight.grad.to_local()[0, 0, 0, 0] = float("nan")
    try:
        opt.step()
        raised = None
    except NonFiniteGradientError as err:
        raised = str(err)
    after = snapshot(model, opt, method)
    return {"raised": raised, "before": before, "after": after}


def run_fsdp_point_split(rank: int) -> dict:
    """A Grassmann1 weight sharded along its point dim is refused by name."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=False).double()
    fully_shard(layer, shard_placement_fn=lambda p: Shard(1))
    try:
        SGDG([{"params": list(layer.named_parameters()), "manifold": Grassmann1()}], lr=0.1)
        return {"raised": None}
    except ValueError as err:
        return {"raised": str(err)}


SCENARIOS: dict[str, Callable[[int, str], dict]] = {
    "ddp_sgdg": lambda rank, outdir: run_ddp(rank, "sgdg"),
    "ddp_adamg": lambda rank, outdir: run_ddp(rank, "adamg"),
    "fsdp_sgdg": lambda rank, outdir: run_fsdp(rank, "sgdg"),
    "fsdp_adamg": lambda rank, outdir: run_fsdp(rank, "adamg"),
    "fsdp_checkpoint_sgdg": lambda rank, outdir: run_fsdp_checkpoint(rank, outdir, "sgdg"),
    "fsdp_checkpoint_adamg": lambda rank, outdir: run_fsdp_checkpoint(rank, outdir, "adamg"),
    "fsdp_nonfinite_shard": lambda rank, outdir: run_fsdp_nonfinite_shard(rank),
    "fsdp_point_split": lambda rank, outdir: run_fsdp_point_split(rank),
}


def main(outdir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    results = {}
    try:
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = scenario(rank, outdir)
            except Exception:  # recorded for the test to show, other scenarios still run
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
