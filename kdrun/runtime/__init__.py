"""What a run needs around the engine: processes (distributed, preemption, slurm), its directory
(rundir, run_guard), checkpoints, and its logs (logger, console_log)."""
