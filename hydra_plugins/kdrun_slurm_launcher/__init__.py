"""kdrun's SLURM launcher for Hydra: hydra-submitit-launcher's ``SlurmLauncher`` that reports a refused
submission as one paragraph and stops waiting on a job that can never start (see :mod:`kdrun.runtime.slurm`).

Hydra instantiates launchers only from the ``hydra_plugins`` package, so the class is defined here;
conf/hydra/launcher/slurm.yaml names it as ``_target_``. Without the ``[slurm]`` extra this module defines
nothing (Hydra imports every plugin module at start-up, and an ImportError here would be a warning on
every ``kdrun train``); ``hydra/launcher=slurm`` then fails on the missing ``submitit_slurm`` config with
kdrun.extras' install hint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Sequence

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
except ImportError:  # the [slurm] extra is not installed
    SlurmLauncher = None  # type: ignore[assignment,misc]

if SlurmLauncher is not None:
    import contextlib
    import io
    import logging
    import os
    import sys

    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, filter_overrides
    from omegaconf import OmegaConf

    from kdrun.runtime.slurm import register_resolvers, submission_error, wait_for_jobs

    log = logging.getLogger(__name__)
    register_resolvers()

    class KdrunSlurmLauncher(SlurmLauncher):  # type: ignore[misc,valid-type]
        """``launch`` as the plugin's (hydra-submitit-launcher 1.2 ``BaseSubmititLauncher.launch``: the same
        executor, parameters and array submission), with kdrun's submission error and wait."""

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            import submitit
            from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

            assert self.config is not None
            assert len(job_overrides) > 0
            params = self.params
            init_keys = {"max_num_timeout", "submitit_folder"}
            executor = submitit.AutoExecutor(
                cluster=self._EXECUTOR, folder=params["submitit_folder"],
                **{f"{self._EXECUTOR}_max_num_timeout": params["max_num_timeout"]}
                if "max_num_timeout" in params else {})
            baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(**{k if k in baseparams else f"{self._EXECUTOR}_{k}": v
                                          for k, v in params.items() if k not in init_keys})

            log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            if "mode" in self.config.hydra.sweep:
                os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))

            job_params: List[Any] = []
            for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
                log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
                job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                                   Singleton.get_state()))
            # submitit prints sbatch's stderr itself when sbatch fails; that text belongs in the one paragraph
            # below, not on a line of its own above it (whatever sbatch says on success is passed on).
            with contextlib.redirect_stderr(io.StringIO()) as said:
                try:
                    jobs = executor.map_array(self, *zip(*job_params))
                except submitit.core.utils.FailedJobError as e:  # sbatch exited non-zero; e: its stderr
                    raise submission_error(str(e), params) from None
            sys.stderr.write(said.getvalue())
            labels = {str(j.job_id): f"#{p[2]}: {' '.join(filter_overrides(p[0]))}" for j, p in zip(jobs, job_params)}
            log.info(f"Slurm job(s) {', '.join(labels)} submitted; logs in {jobs[0].paths.folder.parent}")
            # Every job has written its result when this returns (else SlurmError), so submitit's results()
            # below reads them at once; on a job without a result it would wait for sacct forever.
            wait_for_jobs(jobs, params, labels)
            return [j.results()[0] for j in jobs]
