"""Reference implementations that d2norm's layers are checked and benchmarked against.

Slow on purpose and written for readability; not for training. Used by ``tests/`` (float64
comparisons) and ``benchmarks/`` (the official codes' formulations, timed side by side):

* :mod:`d2norm.testing.cbn_reference`: ``ReferenceConvCBN``, CBN from its definition with
  autograd statistic gradients and stored weights, as the official code computes it.
* :mod:`d2norm.testing.mabn_reference`: ``MABNReference`` (step-by-step float64 MABN) and
  ``OfficialStyleMABN2d`` (the official code's Python-branching formulation).
* :mod:`d2norm.testing.renorm_frn_evonorm_reference`: BRN (Algorithm 1 with the paper's
  backward formulas), FRN + TLU and EvoNorm-S0, float64, written from the papers.
"""
