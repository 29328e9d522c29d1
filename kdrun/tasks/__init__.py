"""Tasks (the ``task`` config group): own the task loss, the objective grouping and evaluation."""
