"""Optimisers and learning-rate schedules (the ``optimizer`` and ``scheduler`` config groups)."""
