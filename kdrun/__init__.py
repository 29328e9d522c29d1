"""kdrun: knowledge distillation treated as multi-objective optimisation."""

__version__ = "0.1.0"
