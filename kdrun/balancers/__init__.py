"""Balancers: how the named loss vector of a step becomes the student's parameter update.

The interface is :class:`kdrun.balancers.base.Balancer`; a method states its weights and one of the bases
in :mod:`kdrun.balancers.base` applies them (:class:`~kdrun.balancers.base.LossWeighting`: one backward of
Σ wᵢ Lᵢ; :class:`~kdrun.balancers.base.GradientWeighting` / :class:`~kdrun.balancers.base.GramWeighting`:
Σ wᵢ gᵢ from the per-objective gradients). The shared gradient machinery (per-objective Jacobian, rank
averaging, Gram matrix, diagnostics) is :mod:`kdrun.balancers.gradients`. One file per method, each
stating the equation it implements, and one ``conf/balancer/`` option per method.
"""
