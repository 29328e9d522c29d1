"""kdrun.runtime.slurm without a cluster: the preset's task count, the wording of Slurm's refusals, and the sweep's wait
(what it does on a job that can never start, one that ended without a result, and a flaky squeue). The same
paths against a real Slurm: test_cluster.py."""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Optional

import pytest

from kdrun.runtime.slurm import (JobState, SlurmError, slurm_error_message, submission_error, tasks_per_node,
                         wait_for_jobs)

PARAMS = {"partition": "debug", "nodes": 1, "tasks_per_node": 1, "cpus_per_task": 8, "gpus_per_node": None,
          "timeout_min": 60}


def test_tasks_per_node_follows_gpus_then_devices_then_one() -> None:
    assert tasks_per_node(8, 1) == 8 and tasks_per_node(4, "auto") == 4  # one rank per GPU
    assert tasks_per_node(None, 2) == 2 and tasks_per_node(0, 3) == 3  # CPU ranks: trainer.devices
    assert tasks_per_node(None, "auto") == 1 and tasks_per_node(None, 1) == 1
    assert tasks_per_node(True, True) == 1  # booleans are not counts


def test_slurm_preset_composes_for_cpu_and_gpu_partitions() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kdrun.cli import config_dir

    def launcher(*overrides: str) -> dict[str, Any]:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", return_hydra_config=True,
                          overrides=["hydra/launcher=slurm", *overrides])
        OmegaConf.set_struct(cfg, False)
        cfg.hydra.job.name = "kdrun"
        return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)  # type: ignore[return-value]

    cpu = launcher()
    assert cpu["_target_"] == "hydra_plugins.kdrun_slurm_launcher.KdrunSlurmLauncher"
    # Nothing a CPU partition refuses: no GPU request, one task, Slurm's default CPUs per task.
    assert (cpu["gpus_per_node"], cpu["tasks_per_node"], cpu["cpus_per_task"]) == (None, 1, None)
    assert launcher("trainer.devices=2")["tasks_per_node"] == 2
    assert launcher("hydra.launcher.gpus_per_node=4", "trainer.devices=auto")["tasks_per_node"] == 4
    assert launcher("hydra.launcher.tasks_per_node=3")["tasks_per_node"] == 3


def test_an_sbatch_refusal_is_one_paragraph_with_slurms_words_and_the_fix() -> None:
    msg = str(submission_error("sbatch: error: Invalid generic resource (gres) specification\n",
                               {**PARAMS, "gpus_per_node": 1}))
    assert "\n" not in msg
    assert msg.startswith("Slurm refused the sweep's jobs (sbatch: error: Invalid generic resource (gres) "
                          "specification); the jobs asked for partition=debug, nodes=1, tasks_per_node=1, "
                          "cpus_per_task=8, gpus_per_node=1")
    assert "leave hydra.launcher.gpus_per_node unset (null)" in msg
    other = str(submission_error("sbatch: error: something new\nsbatch: error: second line", PARAMS))
    assert "(sbatch: error: something new sbatch: error: second line)" in other and "--cfg hydra" in other


def test_slurm_error_message_finds_the_error_in_hydras_chain() -> None:
    from kdrun.commands.train import hydra_error_message

    inner = SlurmError("Slurm job 3 can never start")
    try:
        try:
            raise inner
        except SlurmError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as outer:
        assert slurm_error_message(outer) == "Slurm job 3 can never start"
        assert hydra_error_message(outer) == "Slurm job 3 can never start"  # what `kdrun train -m` prints
    assert slurm_error_message(ValueError("x")) is None


def fake_job(tmp_path: Path, job_id: str, err: str = "") -> Any:
    folder = tmp_path / job_id
    folder.mkdir()
    (folder / f"{job_id}_0_log.err").write_text(err)
    return SimpleNamespace(job_id=job_id, paths=SimpleNamespace(
        result_pickle=folder / f"{job_id}_0_result.pkl", stderr=folder / f"{job_id}_0_log.err",
        stdout=folder / f"{job_id}_0_log.out"))


class Queue:
    """squeue's answers, one per call (the last one repeats); None = squeue failed."""

    def __init__(self, *answers: Optional[dict[str, JobState]]) -> None:
        self.answers, self.calls = list(answers), 0

    def __call__(self, job_ids: Iterable[str]) -> Optional[dict[str, JobState]]:
        self.calls += 1
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def test_a_job_that_can_never_start_cancels_the_sweep_and_names_the_reason(tmp_path: Path) -> None:
    jobs = [fake_job(tmp_path, "7_0"), fake_job(tmp_path, "7_1")]
    cancelled: list[list[str]] = []
    queue = Queue({"7_0": JobState("PENDING", "None"), "7_1": JobState("PENDING", "None")},
                  {"7_0": JobState("PENDING", "PartitionConfig"), "7_1": JobState("PENDING", "PartitionConfig")})
    with pytest.raises(SlurmError) as e:
        wait_for_jobs(jobs, PARAMS, {"7_0": "#0: balancer=fixed"}, poll_s=lambda w: 0.0, query=queue,
                      cancel=lambda ids: cancelled.append(list(ids)), sleep=lambda s: None)
    assert cancelled == [["7"]] and queue.calls == 2
    msg = str(e.value)
    assert msg.startswith("Slurm job 7_0 (sweep point #0: balancer=fixed) can never start: it is pending with "
                          "reason PartitionConfig (the request is larger than the partition allows")
    assert "cpus_per_task=8" in msg and "the sweep's jobs (7) are cancelled" in msg and "\n" not in msg


def test_req_node_not_avail_with_details_counts_as_never_starting(tmp_path: Path) -> None:
    jobs = [fake_job(tmp_path, "9")]
    with pytest.raises(SlurmError, match=r"reason ReqNodeNotAvail, UnavailableNodes:n1 \(the nodes"):
        wait_for_jobs(jobs, PARAMS, poll_s=lambda w: 0.0, sleep=lambda s: None, cancel=lambda ids: None,
                      query=Queue({"9": JobState("PENDING", "ReqNodeNotAvail, UnavailableNodes:n1")}))


def test_a_job_that_failed_without_a_result_reports_kdruns_own_error(tmp_path: Path) -> None:
    """A user error inside the job exits 2 without a result file; submitit would wait for sacct forever."""
    job = fake_job(tmp_path, "8_1", err="submitit INFO starting\nkdrun: error: balancer DTOAmortised is "
                                        "defined for at least 2 objectives, got 1 (task).\nsrun: error: vm: task 0: "
                                        "Exited with exit code 2\n")
    done = fake_job(tmp_path, "8_0")
    done.paths.result_pickle.write_bytes(b"x")
    with pytest.raises(SlurmError) as e:
        wait_for_jobs([done, job], PARAMS, {"8_1": "#1: balancer=dto"}, poll_s=lambda w: 0.0,
                      query=Queue({"8_1": JobState("FAILED", "NonZeroExitCode")}), sleep=lambda s: None,
                      result_grace_s=0.0)
    assert str(e.value) == (f"Slurm job 8_1 (sweep point #1: balancer=dto) ended (FAILED) without a result: "
                            f"kdrun: error: balancer DTOAmortised is defined for at least 2 objectives, got 1 "
                            f"(task). (the job's log: {job.paths.stderr}, and 8_1_0_log.out beside it).")


def test_the_wait_logs_state_changes_survives_a_failed_squeue_and_ends_on_the_results(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    job = fake_job(tmp_path, "5")
    answers = [{"5": JobState("PENDING", "Resources")}, None, {"5": JobState("RUNNING", "None")},
               {"5": JobState("RUNNING", "None")}]

    def query(ids: Iterable[str]) -> Optional[dict[str, JobState]]:
        if len(answers) == 1:
            job.paths.result_pickle.write_bytes(b"x")  # the job finished
        return answers.pop(0) if len(answers) > 1 else answers[0]

    with caplog.at_level(logging.INFO, logger="kdrun.runtime.slurm"):
        wait_for_jobs([job], PARAMS, poll_s=lambda w: 0.0, query=query, sleep=lambda s: None)
    assert [r.getMessage() for r in caplog.records if r.name == "kdrun.runtime.slurm"] == [
        "Slurm job 5: PENDING (Resources)", "Slurm job 5: RUNNING"]
