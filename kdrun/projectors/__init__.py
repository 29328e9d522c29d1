"""Projectors (the ``projector`` config group): how student and teacher features meet.

A projector config is a *partial* (``_partial_: true``): feature losses call it as
``factory(student_dim=..., teacher_dim=...)`` once the feature sizes are known, and get an
``nn.Module`` mapping ``(z_s, z_t) -> (z_s', z_t')`` into a common space.
"""
