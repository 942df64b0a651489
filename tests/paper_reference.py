"""Plain numpy transcription of SGD-G (Algorithm 1) and Adam-G of Cho & Lee (NIPS 2017).

Written from the paper (``docs/design.md``, "The optimizers SGD-G and Adam-G"), one row (one
weight vector) at a time, with no torch and no import of rbn_geoopt: the optimizers are
tested against it.

Rows are weight vectors ``y``. The paper normalizes each weight before a step and works at
the unit vector. The gradient ``g`` handed to ``step`` is the Euclidean gradient of a
scale-invariant loss with respect to the CURRENT representative ``y`` (``|y| = r``); at the
unit vector ``y / r`` the same loss has the gradient ``r * g``.

Per row (unit ``y``)::

    g   <- r * g + 2 * omega * (Y Y^T Y - Y)_row        # orthogonality (paper, section 4)
    h   = g - (y . g) y                                  # gradient on G(1,n)
    h^  = h * min(1, nu / |h|)                           # clipping
    SGD-G:  d = gamma * tau - lr * h^
    Adam-G: m = b1 m + (1-b1) h^;  v = b2 v + (1-b2) |h^|^2
            d = -lr sqrt(1 - b2^t) / (1 - b1^t) * m / sqrt(v + eps)
    y_new = y cos(t) + (d / |d|) sin(t),  t = |d|        # exponential map
    transport of a tangent w along the step, e = d / |d|:
            w_new = w + (e . w) * ((cos(t) - 1) e - sin(t) y)
    SGD-G: tau = transport(d) = d cos(t) - y |d| sin(t);   Adam-G: m = transport(m)
"""

from __future__ import annotations

import math

import numpy as np


def exp_map(y: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Geodesic of the unit sphere from unit ``y`` with velocity ``d`` (``y . d = 0``)."""
    t = float(np.linalg.norm(d))
    if t == 0.0:
        return y.copy()
    return y * math.cos(t) + d / t * math.sin(t)


def transport(y: np.ndarray, d: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Parallel transport of tangent ``w`` at unit ``y`` along ``exp_map(y, s d)``, s in [0,1]."""
    t = float(np.linalg.norm(d))
    if t == 0.0:
        return w.copy()
    e = d / t
    return w + float(e @ w) * ((math.cos(t) - 1.0) * e - math.sin(t) * y)


def clip(h: np.ndarray, nu: float | None) -> np.ndarray:
    """``h * min(1, nu / |h|)``; ``nu = None`` is no clipping."""
    if nu is None:
        return h
    n = float(np.linalg.norm(h))
    return h if n <= nu else h * (nu / n)


class _Reference:
    """Shared part: rows, their current scale, the unit-point gradient."""

    def __init__(self, rows: np.ndarray, lr: float, grad_clip: float | None, omega: float):
        rows = np.array(rows, dtype=np.float64)
        self.scale = np.linalg.norm(rows, axis=1)
        self.Y = rows / self.scale[:, None]
        self.lr = lr
        self.grad_clip = grad_clip
        self.omega = omega

    def _clipped_grads(self, G: np.ndarray) -> list[np.ndarray]:
        Y = self.Y
        G = np.array(G, dtype=np.float64) * self.scale[:, None]
        if self.omega:
            G = G + 2.0 * self.omega * (Y @ Y.T @ Y - Y)
        out = []
        for i in range(Y.shape[0]):
            y, g = Y[i], G[i]
            h = g - float(y @ g) * y
            out.append(clip(h, self.grad_clip))
        return out


class SGDGReference(_Reference):
    """Algorithm 1 (SGD-G): ``step(G)`` moves every row; ``Y`` holds the unit rows."""

    def __init__(
        self,
        rows: np.ndarray,
        lr: float,
        momentum: float = 0.0,
        grad_clip: float | None = None,
        omega: float = 0.0,
    ):
        super().__init__(rows, lr, grad_clip, omega)
        self.momentum = momentum
        self.tau = np.zeros_like(self.Y)

    def step(self, G: np.ndarray) -> np.ndarray:
        hs = self._clipped_grads(G)
        for i, h in enumerate(hs):
            y = self.Y[i].copy()  # not a view: Y[i] is overwritten below
            d = self.momentum * self.tau[i] - self.lr * h
            self.Y[i] = exp_map(y, d)
            self.tau[i] = transport(y, d, d)
        self.scale = np.ones(self.Y.shape[0])
        return self.Y


class AdamGReference(_Reference):
    """Adam-G: ``m`` per row (tangent), ``v`` one scalar per row."""

    def __init__(
        self,
        rows: np.ndarray,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        grad_clip: float | None = None,
        omega: float = 0.0,
    ):
        super().__init__(rows, lr, grad_clip, omega)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.m = np.zeros_like(self.Y)
        self.v = np.zeros(self.Y.shape[0])
        self.t = 0

    def step(self, G: np.ndarray) -> np.ndarray:
        hs = self._clipped_grads(G)
        self.t += 1
        b1, b2, t = self.beta1, self.beta2, self.t
        for i, h in enumerate(hs):
            y = self.Y[i].copy()  # not a view: Y[i] is overwritten below
            self.m[i] = b1 * self.m[i] + (1 - b1) * h
            self.v[i] = b2 * self.v[i] + (1 - b2) * float(h @ h)
            step_size = self.lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            d = -step_size * self.m[i] / math.sqrt(self.v[i] + self.eps)
            self.Y[i] = exp_map(y, d)
            self.m[i] = transport(y, d, self.m[i])
        self.scale = np.ones(self.Y.shape[0])
        return self.Y
