"""Preemption, kill -9 and damaged checkpoints: a stopped run resumes to exactly where an uninterrupted
one ends, and a bad checkpoint fails with an error that names it while the previous one survives."""
from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from kdrun.runtime import checkpoint as ckpt
from kdrun.models.build import CheckpointError
from tests.conftest import run
from tests.distributed.conftest import (FT, FT_STEPS_PER_EPOCH, assert_identical, finish, free_port,
                                        kdrun_train, pause, trainable, wait_for)


def test_kill9_of_an_srun_job_mid_epoch_resumes_bit_identically(two_proc: dict[str, Path],
                                                               tmp_path: Path) -> None:
    """Two ranks started the way srun starts them (SLURM_* + MASTER_ADDR/PORT, every rank runs the
    CLI and Hydra) are killed with SIGKILL mid-epoch; `trainer.resume=auto` from the periodic
    mid-epoch checkpoint, now through kdrun's own launcher, ends bit-identical to a run that was never
    interrupted. Also: only rank 0's Hydra directory exists (the default ${now:} run dir)."""
    marker = tmp_path / "hung"
    hang_at = FT_STEPS_PER_EPOCH + 3  # step 14: in epoch 2, after the checkpoint of step 12
    port = str(free_port())
    (tmp_path / "tmp").mkdir()  # TMPDIR of the ranks: rank 1's Hydra must leave nothing there
    # Every step logged (no effect on the numbers): the kill comes after steps 13 and 14 were logged,
    # past the checkpoint of step 12, and the resumed run logs them again.
    procs = [kdrun_train([*FT, "logger.log_every=1", *pause(hang_at, marker)], cwd=tmp_path, extra_env={
        "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r), "SLURM_NTASKS": "2",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "TMPDIR": str(tmp_path / "tmp")})
        for r in range(2)]
    try:
        wait_for(marker, procs)
    finally:
        for p in procs:
            p.kill()  # SIGKILL: no handler runs, nothing is flushed
            p.wait()
    run_dirs = [d for d in (tmp_path / "runs").glob("*/*") if d.is_dir()]
    assert len(run_dirs) == 1, run_dirs  # rank 1's Hydra wrote no directory here ...
    assert not list((tmp_path / "tmp").glob("kdrun-rank*")), "a scratch directory outlived the kill"  # ... nor there
    run_dir = run_dirs[0]
    state = ckpt.load(run_dir / "last.pt")
    assert (state["step"], state["epoch"], state["epoch_step"]) == (12, 1, 1)  # mid-epoch
    assert len(state["rng_ranks"]) == 2

    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert logged[-1] >= 13  # rows past the checkpoint were written before the kill

    code, out = finish(kdrun_train([*FT, "logger.log_every=1", *pause(-1, marker), "trainer.devices=2",
                                    "trainer.resume=auto", f"hydra.run.dir={run_dir}"]))
    assert code == 0, out[-3000:]
    assert "resumed from" in out and "at epoch 1, step 12" in out
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert logged == list(range(1, 2 * FT_STEPS_PER_EPOCH + 1))  # every step once
    assert_identical(trainable(run_dir / "last.pt"), trainable(two_proc["ft_reference"] / "last.pt"))
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 2 * FT_STEPS_PER_EPOCH


def test_sigterm_to_the_launcher_checkpoints_the_last_step_and_exits_0(two_proc: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    """SIGTERM to `kdrun train trainer.devices=2` while rank 0 is inside step 6: the launcher forwards
    it, the ranks agree to stop after that step, last.pt holds step 7 (steps taken) mid-epoch, the
    exit status is 0, and the resumed run ends bit-identical to the uninterrupted one."""
    marker, run_dir = tmp_path / "in_step", tmp_path / "run"
    p = kdrun_train([*FT, *pause(6, marker, mode="wait_signal"), "trainer.devices=2",
                     f"hydra.run.dir={run_dir}"])
    wait_for(marker, [p])
    p.send_signal(signal.SIGTERM)
    code, out = finish(p)
    assert code == 0, out[-3000:]
    assert "stopped by SIGTERM after step 7" in out
    state = ckpt.load(run_dir / "last.pt")
    assert (state["step"], state["epoch"], state["epoch_step"]) == (7, 0, 7)
    assert ckpt.load(run_dir / "last.pt.prev")["step"] == 4  # the periodic checkpoint before it
    assert json.loads((run_dir / "preempted.json").read_text())["signal"] == "SIGTERM"
    assert not (run_dir / "results.json").exists()  # the run is not finished

    code, out = finish(kdrun_train([*FT, *pause(-1, marker), "trainer.devices=2", "trainer.resume=auto",
                                    f"hydra.run.dir={run_dir}"]))
    assert code == 0, out[-3000:]
    assert not (run_dir / "preempted.json").exists()
    assert_identical(trainable(run_dir / "last.pt"), trainable(two_proc["ft_reference"] / "last.pt"))


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGUSR1", 0)])
def test_single_process_stop_resumes_bit_identically(sig: str, code: int, tmp_path: Path) -> None:
    """One process, augmentation on (the resumed run must continue the same random stream): a signal
    during step 5 stops after it; resuming reproduces the uninterrupted run bit for bit."""
    over = [*FT, "trainer.batch_size=128", "trainer.epochs=1", "trainer.save_every_steps=0"]
    full = run([*over, *pause(-1, tmp_path / "never")], tmp_path / "full")
    handler_before = signal.getsignal(getattr(signal, sig))
    stopped = run([*over, *pause(5, tmp_path / "m", mode="signal_self", signal_name=sig)], tmp_path / "part")
    assert stopped["preempted"] == sig and stopped["exit_code"] == code
    assert ckpt.load(tmp_path / "part" / "last.pt")["step"] == 6
    assert signal.getsignal(getattr(signal, sig)) is handler_before  # kdrun's handler is gone again
    resumed = run([*over, *pause(-1, tmp_path / "never"), "trainer.resume=auto"], tmp_path / "part")
    assert resumed["steps"] == full["steps"]
    assert_identical(trainable(tmp_path / "part" / "last.pt"), trainable(tmp_path / "full" / "last.pt"))
    assert resumed["final"] == full["final"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_corrupt_last_checkpoint_names_the_file_and_keeps_the_previous(tmp_path: Path) -> None:
    over = [*FT, "trainer.batch_size=128", "trainer.epochs=1", "trainer.max_steps=6",
            "trainer.save_every_steps=2", "trainer.save_best=false"]
    run(over, tmp_path)
    last, prev = tmp_path / "last.pt", tmp_path / "last.pt.prev"
    assert ckpt.load(last)["step"] == 6 and ckpt.load(prev)["step"] == 4
    before = sha(prev)
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])  # truncated, as by a full disk

    with pytest.raises(CheckpointError) as e:
        run([*over, "trainer.max_steps=8", "trainer.resume=auto"], tmp_path)
    msg = str(e.value)
    assert str(last) in msg and f"trainer.resume={prev}" in msg
    assert sha(prev) == before  # untouched

    res = run([*over, "trainer.max_steps=8", f"trainer.resume={prev}"], tmp_path)
    assert res["steps"] == 8


def test_checkpoint_of_another_model_names_the_mismatched_keys(tmp_path: Path) -> None:
    over = [*FT, "trainer.batch_size=128", "trainer.epochs=1", "trainer.max_steps=2"]
    run(over, tmp_path)
    with pytest.raises(CheckpointError) as e:
        run([*over, "student.model.widths=[8,16,24]", "trainer.resume=auto"], tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "last.pt") in msg
    assert "student.model.fc.weight" in msg or "fc.weight" in msg
    assert "shape mismatches" in msg


def test_rotation_keeps_a_complete_previous_file(tmp_path: Path) -> None:
    from kdrun.runtime.checkpoint import keep_previous

    path = tmp_path / "last.pt"
    keep_previous(path)  # nothing to keep yet
    assert not (tmp_path / "last.pt.prev").exists()
    ckpt.save_atomic({"v": torch.tensor(1)}, path)
    keep_previous(path)
    ckpt.save_atomic({"v": torch.tensor(2)}, path)
    assert torch.load(tmp_path / "last.pt.prev")["v"] == 1 and torch.load(path)["v"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.prev"]  # no temp files
    assert os.stat(path).st_ino != os.stat(tmp_path / "last.pt.prev").st_ino
