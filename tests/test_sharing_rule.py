"""The grouping rule of ``hydra/launcher=kdrun_shared`` (kdrun/runtime/sharing.py) on composed configs of
real recipes: jobs that differ only on the student side share, anything on the data/teacher side
separates them, and every allow-listed path names a real config key."""
from __future__ import annotations

import dataclasses

import pytest

from kdrun.compose import compose_train_config
from kdrun.config import TrainerConfig
from kdrun.runtime.sharing import STUDENT_SIDE, differences, group_jobs, leaves, plain, student_side

CIFAR = "+recipe=cifar100_resnet56_resnet20_kd"


def cfg(*overrides: str):
    return compose_train_config(list(overrides))


@pytest.mark.parametrize("student_change", [
    ["balancer=dto"], ["balancer=dto_exact", "trainer.grad_space=features"], ["balancer=cross_batch"],
    ["optimizer=adamw"], ["optimizer.lr=0.1"], ["scheduler=cosine"], ["distill.kl.weight=2.0"],
    ["task.objectives={task: [ce], distill: [kl]}"], ["student=resnet8"],
    ["logger.log_every=1", "trainer.save_best=false"], ["trainer.grad_clip=5.0"], ["trainer.resume=auto"],
])
def test_student_side_changes_share(student_change: list[str]) -> None:
    base, other = cfg(CIFAR), cfg(CIFAR, *student_change)
    assert differences(base, other) == []
    assert group_jobs([base, other]) == [[0, 1]]


@pytest.mark.parametrize("data_change, path", [
    (["seed=1"], "seed"), (["trainer.seed=3"], "trainer.seed"), (["trainer.batch_size=32"], "trainer.batch_size"),
    (["dataset.augment=false"], "dataset.augment"), (["teacher=resnet110"], "teacher.model._target_"),
    (["teacher.cache={}"], "teacher.cache"), (["trainer.epochs=10"], "trainer.epochs"),
    (["trainer.max_steps=5"], "trainer.max_steps"), (["trainer.precision=bf16"], "trainer.precision"),
    (["trainer.devices=2"], "trainer.devices"), (["distill.kl.temperature=2.0"], "distill.kl.temperature"),
    (["distill=[kl,fitnet]"], "distill.fitnet._target_"), (["dataset.root=/elsewhere"], "dataset.root"),
])
def test_data_side_changes_separate(data_change: list[str], path: str) -> None:
    base, other = cfg(CIFAR), cfg(CIFAR, *data_change)
    assert path in differences(base, other)
    assert group_jobs([base, other]) == [[0], [1]]


def test_recipes_of_one_pair_that_differ_in_the_balancer_share() -> None:
    """The paper recipes of one teacher/student/loss cell with different balancers are one group; another
    loss (a feature term: other teacher taps) or another pair is not."""
    kd, cross, mgda = (cfg(f"+recipe=cifar100_resnet56_resnet20_{r}") for r in ("kd", "kd_cross_batch", "kd_mgda"))
    fitnet = cfg("+recipe=cifar100_resnet56_resnet20_fitnet")
    other_pair = cfg("+recipe=cifar100_resnet110_resnet32x4_kd")
    assert group_jobs([kd, fitnet, cross, other_pair, mgda]) == [[0, 2, 4], [1], [3]]


def test_groups_keep_sweep_order_and_order_by_first_job() -> None:
    """`balancer=fixed,dto seed=1,0`-like sweeps: groups are per seed, members in sweep order."""
    jobs = [cfg("+recipe=quickstart", f"balancer={b}", f"seed={s}") for s in (1, 0) for b in ("fixed", "dto", "mgda")]
    assert group_jobs(jobs) == [[0, 1, 2], [3, 4, 5]]


def test_deit_recipes_share_only_where_the_augmentation_and_terms_agree() -> None:
    """DeiT's kd row (DeiT's augmentation, hard distillation token) and its VkD row (3-Augment, other terms)
    cannot share a pipeline; the same recipe with another balancer can."""
    kd, vkd = cfg("+recipe=deit_tiny_regnety160_kd"), cfg("+recipe=deit_tiny_regnety160_vkd")
    assert {"dataset._target_", "distill.deit_hard._target_"} <= set(differences(kd, vkd))
    assert group_jobs([kd, vkd, cfg("+recipe=deit_tiny_regnety160_kd", "balancer=dto")]) == [[0, 2], [1]]


def test_every_allow_listed_path_is_a_config_key() -> None:
    """A misspelt pattern would silently allow nothing: each names a key of a composed config."""
    paths = set(leaves(plain(cfg("+recipe=cifar100_resnet56_resnet20_mokd", "trainer.compile=false"))))
    for pattern in STUDENT_SIDE:
        assert any(student_side(p) and _covers(pattern, p) for p in paths), pattern


def test_trainer_keys_are_classified_on_purpose() -> None:
    """A new trainer key is data side until someone decides otherwise; this list makes that decision
    visible (it fails when TrainerConfig gains or loses a key)."""
    data_side = {f.name for f in dataclasses.fields(TrainerConfig) if not student_side(("trainer", f.name))}
    assert data_side == {
        "epochs", "max_steps", "batch_size", "val_batch_size", "num_workers", "pin_memory", "persistent_workers",
        "accelerator", "devices", "sync_batchnorm", "precision", "teacher_precision", "channels_last",
        "deterministic", "host_memory", "val_every", "save_every_steps", "seed", "preempt_signals",
        "preempt_check_every", "preempt_grace_s", "dist_timeout_s"}


def _covers(pattern: str, path: tuple[str, ...]) -> bool:
    keys = pattern.split(".")
    return len(path) >= len(keys) and all(k in ("*", p) for k, p in zip(keys, path))
