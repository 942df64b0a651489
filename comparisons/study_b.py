"""Study B: the leading eigenvector of a fixed symmetric matrix, as an optimization on G(1, n).

Minimize ``f(y) = -y^T A y / y^T y`` (minus the Rayleigh quotient) over lines ``[y]``; the
optimum ``-lambda_max`` comes from ``numpy.linalg.eigh``. ``A = Q diag(lambda) Q^T`` with a
random orthogonal ``Q`` (fixed seed) and the spectrum ``lambda = (1, linspace(0.9, -1,
n - 1))``: an eigengap of 0.1, so that the Riemannian Hessian at the optimum has condition
number 20 for every ``n``. Every method starts from the same random unit vector (one per
seed) and runs in float64 on full (deterministic) gradients; a method "reaches" the optimum
at the first iterate with ``f(y) + lambda_max <= tol`` (``tol = 1e-10``).

The torch methods get a small learning-rate (and momentum) grid each and report their best
grid point (fewest median iterations); pymanopt's solvers use their own line search / trust
region, untuned. Seconds are wall time from the start of the run to the reaching iterate,
gradient evaluations included.

Example::

    result = run_study_b(BUDGETS["smoke"], seeds=[0], progress=False)
    result["sizes"]["20"]["methods"]["SGD-G"]["iterations"]  # about 60
"""

from __future__ import annotations

import itertools
import math
import time
import warnings

import geoopt
import numpy as np
import torch
from tqdm import tqdm

__all__ = ["BUDGETS", "METHODS_B", "rayleigh_matrix", "run_study_b"]

BUDGETS = {
    "smoke": {
        "sizes": (20,),
        "max_iters": 300,
        "sgd_grid": {"lr": (0.4,), "momentum": (0.5,)},
        "adam_grid": {"lr": (0.01,)},
    },
    "quick": {
        "sizes": (100, 1000),
        "max_iters": 1000,
        "sgd_grid": {"lr": (0.2, 0.4), "momentum": (0.0, 0.5)},
        "adam_grid": {"lr": (0.03, 0.1)},
    },
    "full": {
        "sizes": (100, 1000),
        "max_iters": 3000,
        "sgd_grid": {"lr": (0.1, 0.2, 0.4, 0.8), "momentum": (0.0, 0.5, 0.9)},
        "adam_grid": {"lr": (0.01, 0.03, 0.1, 0.3)},
    },
}
TOL = 1e-10
GAP = 0.1

#: study B's methods: label -> (kind, rule)
METHODS_B = {
    "SGD-G": ("sgdg", "sgd"),
    "Adam-G": ("adamg", "adam"),
    "RiemannianSGD (Sphere)": ("rsgd", "sgd"),
    "RiemannianAdam (Sphere)": ("radam", "adam"),
    "pymanopt SteepestDescent (Sphere)": ("pymanopt-sd", None),
    "pymanopt TrustRegions (Sphere)": ("pymanopt-tr", None),
}


def rayleigh_matrix(n: int, seed: int = 0, gap: float = GAP) -> np.ndarray:
    """The symmetric ``n x n`` test matrix described in the module docstring."""
    if n < 3:
        raise ValueError(f"n must be >= 3, got {n}")
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    q = q * np.sign(np.diag(r))
    spectrum = np.concatenate([[1.0], np.linspace(1.0 - gap, -1.0, n - 1)])
    a = (q * spectrum) @ q.T
    return (a + a.T) / 2


def start_point(n: int, seed: int) -> np.ndarray:
    """The common random unit start vector of one seed."""
    x = np.random.default_rng(10_000 + seed).standard_normal(n)
    return x / np.linalg.norm(x)


def _torch_optimizer(kind: str, y: torch.nn.Parameter, hyper: dict):
    from rbn_geoopt import Grassmann1
    from rbn_geoopt.optim import create

    if kind in ("sgdg", "adamg"):
        param = geoopt.ManifoldParameter(y, manifold=Grassmann1())
        extra = {"betas": (0.9, 0.99), "eps": 1e-8} if kind == "adamg" else {}
        return param, create(kind, [param], **hyper, **extra)
    param = geoopt.ManifoldParameter(y, manifold=geoopt.Sphere())
    if kind == "rsgd":
        return param, geoopt.optim.RiemannianSGD([param], **hyper)
    return param, geoopt.optim.RiemannianAdam([param], betas=(0.9, 0.99), eps=1e-8, **hyper)


def run_torch(kind: str, a: np.ndarray, x0: np.ndarray, hyper: dict, max_iters: int) -> dict:
    """One torch run: ``{"iterations", "seconds", "final_gap", "gaps"}`` (``iterations`` is
    None when ``tol`` was not reached; ``gaps`` is the gap at every iterate)."""
    lam = float(np.linalg.eigvalsh(a)[-1])
    at = torch.from_numpy(a)
    y, opt = _torch_optimizer(kind, torch.from_numpy(x0.copy()), hyper)
    gaps: list[float] = []
    start = time.perf_counter()
    reached, seconds = None, None
    for it in range(max_iters + 1):
        opt.zero_grad()
        f = -(y @ (at @ y)) / (y @ y)
        gap = float(f.detach()) + lam
        gaps.append(gap)
        if not math.isfinite(gap):
            break
        if gap <= TOL:
            reached, seconds = it, time.perf_counter() - start
            break
        if it == max_iters:
            break
        f.backward()
        opt.step()
    return {"iterations": reached, "seconds": seconds, "final_gap": gaps[-1], "gaps": gaps}


def run_pymanopt(kind: str, a: np.ndarray, x0: np.ndarray, max_iters: int) -> dict:
    """pymanopt's SteepestDescent or TrustRegions on ``Sphere(n)``, same output as
    :func:`run_torch` (the gap of every iterate)."""
    import pymanopt
    from pymanopt.manifolds import Sphere
    from pymanopt.optimizers import SteepestDescent, TrustRegions

    lam = float(np.linalg.eigvalsh(a)[-1])
    manifold = Sphere(a.shape[0])

    @pymanopt.function.numpy(manifold)
    def cost(x):
        return -x @ a @ x

    @pymanopt.function.numpy(manifold)
    def egrad(x):
        return -2.0 * (a @ x)

    @pymanopt.function.numpy(manifold)
    def ehess(x, u):
        return -2.0 * (a @ u)

    problem = pymanopt.Problem(manifold, cost, euclidean_gradient=egrad, euclidean_hessian=ehess)
    options = {
        "max_iterations": max_iters,
        "min_gradient_norm": 1e-13,
        "min_step_size": 1e-16,
        "max_time": 600,
        "max_cost_evaluations": 100 * max_iters,
        "verbosity": 0,
        "log_verbosity": 1,
    }
    if kind == "pymanopt-sd":
        start = time.time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = SteepestDescent(**options).run(problem, initial_point=x0.copy())
        log = result.log["iterations"]
        gaps = [float(c) + lam for c in log["cost"]]
        hit = next((i for i, g in enumerate(gaps) if g <= TOL), None)
        return {
            "iterations": None if hit is None else int(log["iteration"][hit]),
            "seconds": None if hit is None else float(log["time"][hit] - start),
            "final_gap": gaps[-1] if gaps else float("nan"),
            "gaps": gaps,
        }
    # TrustRegions logs no iterates: it is deterministic, so rerun it for k = 1, 2, ...
    # iterations and take the first k whose returned point is within tol (and its time).
    gaps = [float(-x0 @ a @ x0) + lam]
    for k in range(1, max_iters + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = TrustRegions(**{**options, "max_iterations": k}).run(
                problem, initial_point=x0.copy()
            )
        gaps.append(float(result.cost) + lam)
        if gaps[-1] <= TOL:
            return {"iterations": k, "seconds": result.time, "final_gap": gaps[-1], "gaps": gaps}
        if result.iterations < k:  # stopped on its own before k iterations
            break
    return {"iterations": None, "seconds": None, "final_gap": gaps[-1], "gaps": gaps}


def _grid(kind: str, budget: dict) -> list[dict]:
    grid = budget["sgd_grid"] if kind in ("sgdg", "rsgd") else budget["adam_grid"]
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def _median(values: list[float | None]) -> float | None:
    """Median with unreached (None) runs counted as +inf; None when the median is inf."""
    finite = [math.inf if v is None else v for v in values]
    m = float(np.median(finite))
    return None if math.isinf(m) else m


def _summarize(runs: list[dict], hyper: dict | None) -> dict:
    return {
        "hyper": hyper,
        "iterations": _median([r["iterations"] for r in runs]),
        "seconds": _median([r["seconds"] for r in runs]),
        "final_gap": float(np.median([r["final_gap"] for r in runs])),
        "reached": sum(r["iterations"] is not None for r in runs),
        "runs": len(runs),
        "gaps": runs[0]["gaps"],
    }


def _score(summary: dict) -> tuple:
    its = summary["iterations"]
    gap = summary["final_gap"]
    return (math.inf if its is None else its, gap if math.isfinite(gap) else math.inf)


def run_study_b(
    budget: dict, seeds: list[int], progress: bool = True, methods: list[str] | None = None
) -> dict:
    """All sizes x methods x seeds; returns ``{"tol", "gap", "sizes": {n: {...}}}``."""
    labels = list(METHODS_B) if methods is None else methods
    out: dict = {"tol": TOL, "eigengap": GAP, "max_iters": budget["max_iters"], "sizes": {}}
    jobs = [
        (n, label)
        for n in budget["sizes"]
        for label in labels
        for _ in (_grid(METHODS_B[label][0], budget) if METHODS_B[label][1] else [None])
    ]
    bar = tqdm(total=len(jobs) * len(seeds), desc="study B", leave=False, disable=not progress)
    for n in budget["sizes"]:
        a = rayleigh_matrix(n)
        eig = np.linalg.eigh(a)[0]
        entry = {"lambda_max": float(eig[-1]), "eigengap": float(eig[-1] - eig[-2])}
        results = {}
        for label in labels:
            kind, rule = METHODS_B[label]
            if rule is None:
                runs = [
                    run_pymanopt(kind, a, start_point(n, s), budget["max_iters"]) for s in seeds
                ]
                bar.update(len(seeds))
                results[label] = _summarize(runs, None)
                continue
            best = None
            for hyper in _grid(kind, budget):
                runs = []
                for s in seeds:
                    runs.append(run_torch(kind, a, start_point(n, s), hyper, budget["max_iters"]))
                    bar.update(1)
                summary = _summarize(runs, hyper)
                if best is None or _score(summary) < _score(best):
                    best = summary
            results[label] = best
        entry["methods"] = results
        out["sizes"][str(n)] = entry
    bar.close()
    return out
