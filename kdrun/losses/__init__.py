"""Distillation loss terms (the ``distill`` config group): one file per loss family."""
