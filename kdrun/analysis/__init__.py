"""Reading run directories: the papers' tables, figures, sweeps, TIDE."""
