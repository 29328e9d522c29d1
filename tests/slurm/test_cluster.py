"""kdrun against a real Slurm: the one-node cluster of scripts/slurm_local.sh (see conftest.py).

Each test runs what the README's SLURM section says, on the digits quick config, and is bounded in time.
Measured 2026-12-07 on a busy 2-core machine: sweep 49 s, sbatch script 25 s, USR2 requeue 75-84 s (about
30 s of it the local cluster's requeue delay), errors 11 s; the module 149 s in CI's slurm phase.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdrun.runtime import checkpoint as ckpt
from tests.slurm.conftest import ROOT, job_state, run_cmd, wait_job

pytestmark = pytest.mark.slurm

README = (ROOT / "README.md").read_text()
KDRUN = [sys.executable, "-m", "kdrun.cli", "train"]
SHORT = ["trainer.max_steps=20", "trainer.epochs=1"]  # test-only: the runs' length


def readme_command(marker: str) -> list[str]:
    """The README's shell command (continuation lines joined) that contains ``marker``, as argv."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    for block in blocks:
        for cmd in block.replace("\\\n", " ").splitlines():
            if marker in cmd and not cmd.lstrip().startswith("#"):
                return shlex.split(cmd, comments=True)
    raise AssertionError(f"no README command contains {marker!r}")


def readme_job_script() -> tuple[str, list[str]]:
    """The README's sbatch script and the arguments of its `sbatch --ntasks=2 job.sh ...` example."""
    script = next(b for b in re.findall(r"```bash\n(.*?)```", README, flags=re.S) if "#SBATCH" in b)
    line = next(line for line in script.splitlines() if "sbatch --ntasks=2 job.sh" in line)
    return script, shlex.split(line.lstrip("# "), comments=True)


def test_cpu_sweep_is_one_job_array_with_a_result_per_point(slurm: dict[str, str], tmp_path: Path) -> None:
    """The README's CPU-partition sweep: one 2-element job array; each element one task, no GPU request and
    no cpus-per-task (what every partition satisfies), and each writes its results.json."""
    argv = readme_command("hydra.launcher.partition=debug")
    assert argv[:4] == ["kdrun", "train", "-m", "hydra/launcher=slurm"], argv
    sweep = tmp_path / "sweep"
    p = run_cmd([*KDRUN, *argv[2:], *SHORT, f"hydra.sweep.dir={sweep}"], slurm, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    submitted = re.search(r"Slurm job\(s\) (\d+)_0, \1_1 submitted", p.stdout + p.stderr)
    assert submitted, p.stdout[-2000:] + p.stderr[-2000:]
    results = sorted(sweep.glob("*/results.json"))
    assert [r.parent.name for r in results] == ["0_fixed_seed0", "1_dto_seed0"]
    assert all(json.loads(r.read_text())["steps"] == 20 for r in results)
    script = (sweep / ".submitit" / submitted.group(1) / f"{submitted.group(1)}_submission.sh").read_text()
    assert "#SBATCH --ntasks-per-node=1" in script and "#SBATCH --array=0-1%2" in script
    assert "--gpus-per-node" not in script and "--cpus-per-task" not in script and "--partition=debug" in script
    assert "Slurm job " + submitted.group(1) + "_0: RUNNING" in p.stdout + p.stderr  # it said what it waited on
    assert not (sweep / ".submitit" / "%j").exists()


def test_readme_sbatch_script_as_written_runs_two_srun_ranks(slurm: dict[str, str], tmp_path: Path) -> None:
    """The README's job.sh, unchanged, submitted with its own `sbatch --ntasks=2` example: 2 ranks join one
    process group through srun, one run directory, one results.json, and each rank uses half the cores."""
    script, argv = readme_job_script()
    (tmp_path / "job.sh").write_text(script)
    assert argv[:3] == ["sbatch", "--ntasks=2", "job.sh"], argv
    out = run_cmd([*argv, *SHORT[:1]], slurm, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"Submitted batch job (\d+)", out.stdout).group(1)  # type: ignore[union-attr]
    state = wait_job(job_id, slurm, timeout=240)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    results = list((tmp_path / "runs").rglob("results.json"))
    assert results == [tmp_path / "runs" / f"slurm-{job_id}" / "results.json"], results
    assert json.loads(results[0].read_text())["steps"] == 20
    cores = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout)
    assert f"[kdrun] 2 ranks (slurm); intra-op threads per rank: {max(1, cores // 2)} " \
           f"({cores} cores / 2 ranks on this node)" in log, log[-3000:]
    assert not (tmp_path / "runs" / f"slurm-{job_id}" / "preempted.json").exists()


# Fault tolerance, as tests/distributed: a random teacher, the BatchNorm student with augmentation (every
# random stream must be restored), deterministic kernels and one thread in both runs, so that the requeued
# run must be bit-identical to the uninterrupted one. PauseAt (a zero loss term) holds step 10 until the
# signal has arrived, so the stop lands at a known step however busy the machine is.
FT = ["trainer.accelerator=cpu", "trainer.deterministic=true", "logger.progress=false", "logger.backends=[]",
      "scheduler=cosine", "scheduler.warmup_epochs=0", "teacher=convnet_l", "teacher.checkpoint=null",
      "teacher.allow_random=true", "teacher.model.widths=[8,16,32]", "teacher.model.convs_per_stage=1",
      "distill=kl", "trainer.epochs=2", "trainer.max_steps=30", "seed=5",
      "+distill.pause._target_=tests.distributed.helpers.PauseAt", "+distill.pause.mode=wait_signal"]


def test_usr2_requeues_the_job_and_it_resumes_bit_identically(slurm: dict[str, str], tmp_path: Path) -> None:
    """`scancel -s USR2` on a running sweep job: kdrun checkpoints at the next step boundary, submitit requeues
    the job, Slurm starts it again after its requeue delay, and the run continues from last.pt to final
    weights bit-identical to an uninterrupted run (run meanwhile outside Slurm)."""
    env = {**slurm, "OMP_NUM_THREADS": "1"}
    marker, name = tmp_path / "in_step_10", f"kdrun-requeue-{tmp_path.name}"
    sweep = subprocess.Popen([*KDRUN, "-m", "hydra/launcher=slurm", f"hydra.launcher.name={name}", *FT,
                              "+distill.pause.at=10", f"+distill.pause.marker={marker}", "trainer.resume=auto",
                              f"hydra.sweep.dir={tmp_path / 'sweep'}"], env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        reference = run_cmd([*KDRUN, *FT, "+distill.pause.at=-1", f"+distill.pause.marker={tmp_path / 'never'}",
                             f"hydra.run.dir={tmp_path / 'reference'}"], env, timeout=240)
        assert reference.returncode == 0, reference.stderr[-3000:]
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert sweep.poll() is None and time.monotonic() < deadline, "the job never reached step 10"
            time.sleep(0.5)
        job_id = run_cmd(["squeue", "-h", "-n", name, "-o", "%i"], env, 30).stdout.strip()
        assert run_cmd(["scancel", "-s", "USR2", job_id], env, 30).returncode == 0
        out, _ = sweep.communicate(timeout=300)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            subprocess.run(["scancel", "-n", name], env=env, capture_output=True, timeout=30)
    assert sweep.returncode == 0, out[-3000:]
    assert f"Slurm job {job_id}: PENDING (BeginTime)" in out  # requeued, waiting out Slurm's requeue delay
    run_dir = tmp_path / "sweep" / "0_fixed_seed5"
    log = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit" / job_id).glob("*_log.*"))
    assert "SIGUSR2: stopped at epoch 0, step 11 (step 11 of the epoch)" in log, log[-3000:]
    assert "resumed from" in log and "at epoch 0, step 11 (step 11 of the epoch)" in log
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 30
    assert not (run_dir / "preempted.json").exists()
    a, b = ckpt.load(run_dir / "last.pt")["trainable"], ckpt.load(tmp_path / "reference" / "last.pt")["trainable"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "not bit-identical"
    assert wait_job(job_id, env, timeout=60) == "COMPLETED"  # the requeued job ended cleanly after its result


def test_refused_and_unsatisfiable_jobs_are_one_paragraph_errors(slurm: dict[str, str], tmp_path: Path) -> None:
    """A GPU request on the CPU partition: sbatch refuses it, kdrun says so in one paragraph quoting Slurm
    (exit 2). More CPUs per task than the node has: the job would pend forever (PartitionConfig); kdrun
    cancels it and stops with the reason instead of waiting."""
    quick = [*KDRUN, "-m", "hydra/launcher=slurm", "+debug=quick", "trainer.accelerator=cpu", *SHORT]
    p = run_cmd([*quick, "hydra.launcher.gpus_per_node=1", f"hydra.sweep.dir={tmp_path / 'gpu'}"], slurm, 120)
    assert p.returncode == 2, p.stderr[-3000:]
    err = p.stderr.strip().splitlines()
    assert err[-1].startswith("kdrun: error: Slurm refused the sweep's jobs (sbatch: error: Invalid generic "
                              "resource (gres) specification)"), p.stderr[-3000:]
    assert "gpus_per_node" in err[-1] and "Traceback" not in p.stderr
    assert not [line for line in err if line.startswith("sbatch:")]  # quoted in the paragraph, not beside it

    cpus = int(run_cmd(["sinfo", "-h", "-o", "%c"], slurm, 30).stdout.split()[0])
    start = time.monotonic()
    p = run_cmd([*quick, f"hydra.launcher.cpus_per_task={cpus + 1}", "hydra.launcher.name=kdrun-never",
                 f"hydra.sweep.dir={tmp_path / 'cpus'}"], slurm, 120)
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert re.match(r"kdrun: error: Slurm job (\d+) \(sweep point #0: .*\) can never start: it is pending with "
                    r"reason PartitionConfig \(", last), p.stderr[-3000:]
    assert f"cpus_per_task={cpus + 1}" in last and "are cancelled" in last and "Traceback" not in p.stderr
    assert time.monotonic() - start < 60  # stopped, not waiting
    job_id = re.search(r"Slurm job (\d+)", last).group(1)  # type: ignore[union-attr]
    assert job_state(job_id, slurm) == "CANCELLED"
