"""Runnable studies that compare SGD-G and Adam-G with geoopt's sphere optimizers and torch.

Run ``python -m comparisons --help`` from the repository root. Studies:

* A: a BN-CNN on Fashion-MNIST (``study_a``), recipe-as-published and an LR sweep;
* B: the Rayleigh quotient on G(1, n) against pymanopt (``study_b``);
* C: per-step time on the conv weights of a ResNet-18 (``study_c``).

Each study returns a plain ``dict`` of numbers; ``report`` turns them into ``summary.md``,
``results.json`` and PNG plots.
"""
