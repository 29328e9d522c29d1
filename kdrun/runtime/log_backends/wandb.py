"""``logger.backends=[...,wandb]``: a Weights & Biases run per kdrun run (the ``[wandb]`` extra).

The W&B run is named after the run directory, grouped by ``logger.group`` (a sweep job's sweep
directory), in the project ``$WANDB_PROJECT`` (``kdrun`` when unset); its files go to
``<run_dir>/wandb/``. W&B's own variables apply as usual: ``WANDB_MODE=offline`` writes the run there
only (``wandb sync <run_dir>/wandb/offline-run-*`` uploads it later), ``WANDB_ENTITY``, ``WANDB_API_KEY``.
kdrun turns W&B's console capture and end-of-run charts off (:data:`KDRUN_SETTINGS`).

A resumed kdrun run continues the same W&B run: its id is kept in ``trackers.json`` and passed back with
``resume="allow"``. W&B cannot drop what it holds, and ignores a step lower than the last it received;
RunLogger therefore sends a resumed session only the steps after those the killed session logged.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Mapping, Optional

from kdrun.runtime.log_backends.base import BackendRun, BackendStartError


# W&B settings kdrun changes unless their variable (WANDB_CONSOLE, WANDB_QUIET) is set: no console capture
# (cli.log is the run's console, and W&B's stdout wrapper would sit on top of kdrun's), and no run history
# drawn on the console at the end (a chart per logged key).
KDRUN_SETTINGS = {"console": "off", "quiet": True}


class WandbBackend:
    name = "wandb"
    rewinds = False

    def __init__(self, run: BackendRun) -> None:
        import wandb

        files = run.run_dir / "wandb"
        existed = files.exists()
        settings = wandb.Settings(**{k: v for k, v in KDRUN_SETTINGS.items() if f"WANDB_{k.upper()}" not in os.environ})
        try:
            self.run = wandb.init(project=None if os.environ.get("WANDB_PROJECT") else "kdrun", dir=str(run.run_dir),
                                  name=run.name, group=run.group, id=run.resume_id,
                                  resume="allow" if run.resume_id else None, reinit="create_new",
                                  settings=settings)
        except Exception as e:  # W&B's errors (no login, no network, a bad setting) are its own classes
            if not existed:  # a run that did not start leaves nothing in its directory
                shutil.rmtree(files, ignore_errors=True)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BackendStartError(
                f"logger.backends includes wandb, but W&B could not start a run: {first} Log in "
                "(wandb login, or set WANDB_API_KEY), or set WANDB_MODE=offline to keep the run in the run "
                "directory and upload it later with `wandb sync`, or leave wandb out of logger.backends."
            ) from None
        self.run_id: Optional[str] = self.run.id

    def log_params(self, config: Mapping[str, Any]) -> None:
        # allow_val_change: a resumed run may change keys (trainer.resume, a raised trainer.epochs); W&B shows
        # the config of the latest session.
        self.run.config.update(dict(config), allow_val_change=True)

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()
