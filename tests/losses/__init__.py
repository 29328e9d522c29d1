"""Distillation loss terms (kdrun.losses): values, minima, gradients, batch structure, configs."""
