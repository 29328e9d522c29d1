"""``logger.backends=[tensorboard]``: TensorBoard event files in ``<run_dir>/tb/`` (the default backend)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from kdrun.runtime.log_backends.base import BackendRun


class TensorBoardBackend:
    """Scalars as TensorBoard events. A resumed session purges the events from the checkpoint's step + 1
    on (``purge_step``), so that the steps the killed session logged after its checkpoint appear once,
    with the resumed session's values (the checkpoint's own step, e.g. its epoch-end val, was logged
    before the save and is not repeated)."""

    name = "tensorboard"
    rewinds = True
    run_id: Optional[str] = None

    def __init__(self, run: BackendRun) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.run_dir / "tb"),
                                    purge_step=None if run.resumed_at is None else run.resumed_at + 1)

    def log_params(self, config: Mapping[str, Any]) -> None:
        # Nothing: config.yaml beside tb/ holds the config, and TensorBoard's hparams summary would write a
        # second event directory per run, which doubles every job's curves under a sweep's logdir.
        pass

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
