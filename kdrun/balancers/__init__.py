"""Balancers: how the named loss vector of a step becomes the student's parameter update.

The interface is :class:`kdrun.balancers.base.Balancer`; the shared gradient machinery (per-objective
Jacobian, rank averaging, Gram matrix, diagnostics) is :mod:`kdrun.balancers.gradients`. One file per
method, each stating the equation it implements.
"""
