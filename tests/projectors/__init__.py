"""Projectors (kdrun.projectors): shapes, teacher normalisation, orthogonality, configs."""
