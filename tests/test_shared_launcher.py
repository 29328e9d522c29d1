"""``hydra/launcher=kdrun_shared`` end to end (issue #26): a sweep whose jobs differ only on the student side
trains as one group (one loader, one teacher forward per step) and leaves ordinary run directories, equal
to what Hydra's basic launcher leaves; jobs of another seed form another group; a refused job is refused
alone. The grouping rule itself: tests/test_sharing_rule.py; a group's exactness per student: the engine's
tests of kdrun.engine.group."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import kdrun.commands.train_group as train_group_module
from kdrun.commands.train_group import sharing_class
from kdrun.compose import compose_train_config
from tests.conftest import QUICK

Cli = Callable[..., tuple[int, str, str]]
# What differs between two runs of the same config: the clock, the directory, the machine's speed.
VOLATILE = {"wall_time_s", "session_wall_time_s", "images_per_s", "run_dir", "train/images_per_s"}


def sweep(teacher: str, out: Path, *extra: str, launcher: str = "kdrun_shared") -> list[str]:
    return ["train", "-m", "+recipe=quickstart", f"teacher.checkpoint={teacher}", *QUICK, "trainer.max_steps=3",
            "logger.log_every=1", *extra, f"hydra/launcher={launcher}", f"hydra.sweep.dir={out}"]


@pytest.fixture
def groups_trained(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The run directories of every group trained together (the real train_group, spied on)."""
    seen: list[list[str]] = []
    real = train_group_module.train_jobs

    def spy(cfgs: list, checked: list, settings: list, run_dirs: list[Path], records: list) -> list[dict[str, Any]]:
        seen.append([Path(d).name for d in run_dirs])
        return real(cfgs, checked, settings, run_dirs, records)

    monkeypatch.setattr(train_group_module, "train_jobs", spy)
    return seen


def strip(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in VOLATILE}


def run_files(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, torch.Tensor]]:
    """results.json and metrics.jsonl without the clock, and the student's weights in last.pt."""
    results = strip(json.loads((run_dir / "results.json").read_text()))
    results["config"]["logger"].pop("group", None)  # a sweep job's tracker group: its sweep directory
    rows = [strip(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["trainable"]
    return results, rows, weights


def test_a_balancer_sweep_trains_as_one_group_and_equals_the_basic_launcher(
        kdrun_cli: Cli, digits_teacher: str, groups_trained: list[list[str]], tmp_path: Path) -> None:
    shared, basic = tmp_path / "shared", tmp_path / "basic"
    code, out, err = kdrun_cli(*sweep(digits_teacher, shared, "balancer=fixed,dto"))
    assert code == 0, err[-3000:]
    assert groups_trained == [["0_fixed_seed0", "1_dto_seed0"]]
    assert out.count("kdrun: done.") == 2  # each job's own summary
    code, _, err = kdrun_cli(*sweep(digits_teacher, basic, "balancer=fixed,dto", launcher="basic"))
    assert code == 0, err[-3000:]
    for job in ("0_fixed_seed0", "1_dto_seed0"):
        for name in ("results.json", "metrics.jsonl", "last.pt", "best.pt", "cli.log", "config.yaml",
                     ".hydra/overrides.yaml"):
            assert (shared / job / name).is_file(), (job, name)
        assert any((shared / job / "tb").iterdir())
        (res_s, rows_s, w_s), (res_b, rows_b, w_b) = run_files(shared / job), run_files(basic / job)
        assert res_s == res_b
        assert rows_s == rows_b
        assert w_s.keys() == w_b.keys() and all(torch.equal(w_s[k], w_b[k]) for k in w_s), job
        assert (shared / job / ".hydra/overrides.yaml").read_text() == (basic / job / ".hydra/overrides.yaml").read_text()
    code, out, err = kdrun_cli("tables", str(shared))
    assert code == 0, err
    assert "balancer=fixed" in out and "balancer=dto" in out


def test_another_seed_is_another_group(kdrun_cli: Cli, digits_teacher: str, groups_trained: list[list[str]],
                                       tmp_path: Path) -> None:
    code, _, err = kdrun_cli(*sweep(digits_teacher, tmp_path / "s", "balancer=fixed,dto", "seed=0,1",
                                    "trainer.max_steps=1"))
    assert code == 0, err[-3000:]
    assert groups_trained == [["0_fixed_seed0", "2_dto_seed0"], ["1_fixed_seed1", "3_dto_seed1"]]


def test_a_refused_job_is_refused_alone(kdrun_cli: Cli, digits_teacher: str, groups_trained: list[list[str]],
                                        tmp_path: Path) -> None:
    """Job 1's directory already holds a run: it is refused in one paragraph and left as it was, job 0 of
    its group trains, and the sweep exits 2 saying which job did not run."""
    out = tmp_path / "s"
    taken = out / "1_dto_seed0"
    taken.mkdir(parents=True)
    (taken / "results.json").write_text('{"earlier": true}')
    code, _, err = kdrun_cli(*sweep(digits_teacher, out, "balancer=fixed,dto", "trainer.max_steps=1"))
    assert code == 2
    assert groups_trained == [["0_fixed_seed0", "1_dto_seed0"]]
    assert err.count("already holds a run") == 1 and str(taken) in err and "Traceback" not in err
    assert "1 of the sweep's 2 jobs were refused (#1)" in err
    assert (out / "0_fixed_seed0" / "results.json").is_file()
    assert sorted(p.name for p in taken.iterdir()) == ["results.json"]
    assert (taken / "results.json").read_text() == '{"earlier": true}'


def test_a_crashed_job_fails_alone_and_the_sweep_fails_at_its_end(
        kdrun_cli: Cli, digits_teacher: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """One student of a group raised (the engine caught it: an error entry that is not a user error): the
    other job of the group ends as usual and the sweep then fails with that job's error, as a job that raised
    does under Hydra's basic launcher."""
    real = train_group_module.train_jobs

    def second_crashes(cfgs: list, checked: list, settings: list, run_dirs: list[Path],
                       records: list) -> list[dict[str, Any]]:
        results = real(cfgs, checked, settings, run_dirs, records)
        results[1] = {"run_dir": str(run_dirs[1]), "error": "RuntimeError: boom in the student step",
                      "user_error": False}
        return results

    monkeypatch.setattr(train_group_module, "train_jobs", second_crashes)
    with pytest.raises(train_group_module.JobCrashed, match="boom in the student step"):
        kdrun_cli(*sweep(digits_teacher, tmp_path / "s", "balancer=fixed,dto", "trainer.max_steps=1"))
    assert (tmp_path / "s" / "0_fixed_seed0" / "results.json").is_file()


def test_a_stopped_group_says_so_for_every_job_then_ends_the_sweep(
        kdrun_cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A stop signal stops every student of a group at the same step: each job prints its own stop line
    (with its own directory to resume) and the sweep exits as a stopped job does (0 after SIGTERM), before
    the next group starts."""
    started: list[list[str]] = []

    def stopped(cfgs: list, checked: list, settings: list, run_dirs: list[Path], records: list) -> list[dict[str, Any]]:
        started.append([Path(d).name for d in run_dirs])
        return [{"run_dir": str(d), "preempted": "SIGTERM", "exit_code": 0, "steps": 7,
                 "checkpoint": str(Path(d) / "last.pt")} for d in run_dirs]

    monkeypatch.setattr(train_group_module, "train_jobs", stopped)
    code, out, _ = kdrun_cli("train", "-m", "+recipe=quickstart", *QUICK, "balancer=fixed,dto", "seed=0,1",
                             "hydra/launcher=kdrun_shared", f"hydra.sweep.dir={tmp_path / 's'}")
    assert code == 0
    assert started == [["0_fixed_seed0", "2_dto_seed0"]]  # the seed-1 group never started
    for job in ("0_fixed_seed0", "2_dto_seed0"):
        assert f"hydra.run.dir={tmp_path / 's' / job})" in out


def test_a_group_with_workers_trains_in_them(kdrun_cli: Cli, digits_teacher: str, groups_trained: list[list[str]],
                                            tmp_path: Path) -> None:
    """trainer.devices=2: the group trains in 2 worker processes, as each of its jobs would
    (launch.dispatch_group; tests/distributed/test_group_ddp.py compares the weights with each job alone)."""
    out = tmp_path / "s"
    code, _, err = kdrun_cli(*sweep(digits_teacher, out, "balancer=fixed,dto", "trainer.max_steps=1",
                                    "trainer.devices=2"))
    assert code == 0, err[-3000:]
    assert groups_trained == [["0_fixed_seed0", "1_dto_seed0"]]
    for job in ("0_fixed_seed0", "1_dto_seed0"):
        assert json.loads((out / job / "results.json").read_text())["world_size"] == 2


def test_a_job_whose_config_fails_validation_is_left_alone() -> None:
    """Such a job is not grouped: it runs alone and is refused exactly as under the basic launcher."""
    base = ["+recipe=quickstart", *QUICK]
    assert sharing_class(compose_train_config(base)) == sharing_class(compose_train_config([*base, "balancer=dto"]))
    assert sharing_class(compose_train_config([*base, "trainer.devices=2"])) is not None
    assert sharing_class(compose_train_config([*base, "trainer.epochs=0"])) is None
