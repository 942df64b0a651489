"""SGD-G / Adam-G under DistributedDataParallel and FSDP2 (gloo, 2 CPU processes).

One pair of worker processes (tests/distributed_worker.py, started here on 127.0.0.1 with a
free port, killed after a hard time limit) runs every scenario; each test checks one of
them against a single-process run in float64:

* DDP: every rank's parameters (and Grassmann1 optimizer state) equal the single-process
  run on the full batch to 1e-10;
* FSDP2 ``fully_shard``: parameters are DTensors sharded along dim 0 -- whole points, with
  uneven (3 + 2, 2 + 1) and empty (1 + 0) shards -- and the optimizer, given the manifold
  per param group, matches the single-process run to 1e-10 with ``omega > 0`` (gathered
  orthogonality term) and keeps its state as DTensors;
* FSDP2 + ``torch.distributed.checkpoint``: resume is bit-identical;
* FSDP2: NaN in one rank's gradient shard makes both ranks raise, nothing changes;
* FSDP2 sharding inside a point (``Shard(1)``) is refused with a clear error.

The single-process reference feeds the two per-rank half batches through the model
separately and averages their losses: that is the gradient DDP/FSDP average, because each
rank's BatchNorm normalizes with its own batch statistics (SyncBatchNorm is GPU-only).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import distributed_worker as worker

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240  # hard bound for the pair of workers (they take ~20-40 s on 2 busy cores)
TOL = 1e-10

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="torch built without distributed/gloo support",
    ),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(outdir: Path) -> list[tuple[int, str]]:
    """Run both ranks; return (returncode, output) per rank. Kills them at TIMEOUT_S."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    env.update(WORLD_SIZE=str(worker.WORLD), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.distributed_worker", str(outdir)],
            cwd=ROOT,
            env=dict(env, RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for rank in range(worker.WORLD)
    ]
    try:
        results = []
        for proc in procs:
            out = proc.communicate(timeout=TIMEOUT_S)[0]
            results.append((proc.returncode, out))
        return results
    except subprocess.TimeoutExpired:
        _kill(procs)
        outs = [proc.communicate()[0] for proc in procs]
        pytest.fail(f"distributed workers exceeded {TIMEOUT_S} s:\n" + "\n".join(outs))
    finally:
        _kill(procs)


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _port_taken(results: list[tuple[int, str]]) -> bool:
    return any(code != 0 and "address already in use" in out.lower() for code, out in results)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    outdir = tmp_path_factory.mktemp("distributed")
    results = _launch(outdir)
    if _port_taken(results):  # the free port was taken meanwhile: one more try
        outdir = tmp_path_factory.mktemp("distributed")
        results = _launch(outdir)
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} exited with {code}:\n{out}"
    return [torch.load(outdir / f"rank{r}.pt", weights_only=True) for r in range(worker.WORLD)]


@pytest.fixture(scope="module")
def references() -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads would only contend for the cores
    try:
        out = {}
        for method in ("sgdg", "adamg"):
            model, opt = worker.reference_run(method)
            out[method] = worker.snapshot(model, opt, method)
        return out
    finally:
        torch.set_num_threads(before)


def _scenario(ranks: list[dict], name: str) -> list[dict]:
    results = [r[name] for r in ranks]
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}, {name}:\n{result['error']}"
    return results


def _max_deviation(got: dict, ref: dict) -> float:
    """Largest |difference| over all parameters and Grassmann1 state entries."""
    assert got["params"].keys() == ref["params"].keys()
    worst = 0.0
    for name, value in ref["params"].items():
        assert got["params"][name].shape == value.shape, name
        worst = max(worst, (got["params"][name] - value).abs().max().item())
    for name, entries in ref["state"].items():
        for key, value in entries.items():
            other = got["state"][name][key].to(value.dtype)
            assert other.shape == value.shape, (name, key)
            worst = max(worst, (other - value).abs().max().item())
    return worst


def _moved(ref: dict) -> float:
    start = dict(worker.make_model().named_parameters())
    return max((ref["params"][n] - start[n].detach()).abs().max().item() for n in start)


@pytest.mark.parametrize("method", ["sgdg", "adamg"])
def test_ddp_every_rank_equals_single_process_full_batch(ranks, references, method):
    assert _moved(references[method]) > 1e-2  # the runs really train
    for rank, result in enumerate(_scenario(ranks, f"ddp_{method}")):
        deviation = _max_deviation(result, references[method])
        print(f"DDP {method} rank {rank}: max deviation {deviation:.2e}")
        assert deviation <= TOL, (rank, deviation)


@pytest.mark.parametrize("method", ["sgdg", "adamg"])
def test_fsdp2_sharded_rows_step_like_single_process(ranks, references, method):
    results = _scenario(ranks, f"fsdp_{method}")
    # FSDP2 really sharded: DTensors, dim-0 chunks 3+2, 2+1 and 1+0 (an empty shard)
    expected_rows = {"conv.weight": (3, 2), "fc1.weight": (2, 1), "fc2.weight": (1, 0)}
    for name, rows in expected_rows.items():
        for rank, result in enumerate(results):
            kind, is_dtensor, local_shape = result["layout"][name]
            assert kind != "ManifoldParameter" and is_dtensor, (name, kind)  # class lost
            assert local_shape[0] == rows[rank], (name, rank, local_shape)
    for rank, result in enumerate(results):
        for name in expected_rows:  # state sharded like the rows; Adam's step a plain scalar
            flags = result["state_is_dtensor"][name]
            assert all(flag == (key != "step") for key, flag in flags.items()), (name, flags)
        deviation = _max_deviation(result, references[method])
        print(f"FSDP2 {method} rank {rank}: max deviation {deviation:.2e}")
        assert deviation <= TOL, (rank, deviation)


@pytest.mark.parametrize("method", ["sgdg", "adamg"])
def test_fsdp2_distributed_checkpoint_resume_is_bit_identical(ranks, method):
    for rank, result in enumerate(_scenario(ranks, f"fsdp_checkpoint_{method}")):
        first, second = result["first"], result["second"]
        assert _max_deviation(second, first) == 0.0, rank
        for name, value in first["params"].items():
            assert torch.equal(second["params"][name], value), (rank, name)


def test_fsdp2_nan_in_one_shard_makes_every_rank_raise_and_changes_nothing(ranks):
    results = _scenario(ranks, "fsdp_nonfinite_shard")
    assert "gradient of parameter 'conv.weight'" in results[1]["raised"]  # the NaN's rank
    assert "another rank" in results[0]["raised"]
    for result in results:
        assert _max_deviation(result["after"], result["before"]) == 0.0


def test_fsdp2_sharding_inside_a_point_is_refused_by_name(ranks):
    for result in _scenario(ranks, "fsdp_point_split"):
        assert result["raised"] is not None
        assert "'weight'" in result["raised"] and "sharded along dim 1" in result["raised"]
