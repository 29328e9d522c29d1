"""The teacher-output cache inside the engine (``teacher.cache``): a run that reads the cache trains exactly
as the live teacher run on the same seed (fp32: same losses and weights, bit for bit; fp16: within the
documented rounding), whether it filled the cache itself or found it; resume stays exact; a stale or
mismatched cache, mixup and continuous augmentation are refused with a message.

The data are a tiny in-memory torchvision CIFAR object (8×8 images, the CIFAR protocol's padded crop +
flip with padding 1: 18 views per image), so a whole run takes about a second."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torchvision import transforms as T
from torchvision.datasets import CIFAR100

import kdrun.runtime.checkpoint as ckpt
from kdrun.config import ConfigError
from kdrun.data.base import DataModule
from kdrun.teacher_cache import FP16_ABS_TOL, FP16_REL_TOL, CacheError
from tests.conftest import QUICK, compose_cfg, run


def _cifar(n: int, size: int, classes: int, seed: int, transform: Any) -> CIFAR100:
    ds = CIFAR100.__new__(CIFAR100)  # a real torchvision CIFAR object over random images (no files)
    rng = np.random.default_rng(seed)
    ds.data = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    ds.targets = [int(v) for v in rng.integers(0, classes, n)]
    ds.classes = [str(c) for c in range(classes)]
    ds.transform, ds.target_transform = transform, None
    return ds


def tiny_cifar(num_classes: int = 4, in_chans: int = 3, image_size: int = 8, train_size: int = 64,
               val_size: int = 16, learnable: bool = True, snr: float = 1.0, seed: int = 0,
               augment: str = "crop_flip") -> DataModule:
    """A Hydra ``_target_`` (it takes the synthetic data set's keys): CIFAR-style data, CIFAR KD transform."""
    tail = [T.ToTensor(), T.Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))]
    aug = {"crop_flip": [T.RandomCrop(image_size, padding=1), T.RandomHorizontalFlip()],
           "resized_crop": [T.RandomResizedCrop(image_size)]}[augment]
    train = _cifar(train_size, image_size, num_classes, seed, T.Compose(aug + tail))
    val = _cifar(val_size, image_size, num_classes, seed + 1, T.Compose(tail))
    return DataModule(train=train, val=val, num_classes=num_classes, in_chans=in_chans, image_size=image_size)


STEPS_PER_EPOCH = 4  # 64 images, batch 16
BASE = [*QUICK, "dataset=synthetic", "dataset._target_=tests.engine.test_teacher_cache_engine.tiny_cifar",
        "dataset.num_classes=4", "dataset.image_size=8", "dataset.train_size=64", "dataset.val_size=16",
        "teacher=convnet_l", "teacher.checkpoint=null", "teacher.allow_random=true",
        "teacher.model.widths=[8,16,32]", "teacher.model.convs_per_stage=1",
        "distill=kl", "trainer.batch_size=16", "trainer.epochs=2", "trainer.deterministic=true",
        "logger.log_every=1", "logger.grad_stats_every=3", "logger.backends=[]", "seed=3"]


def cached(cache_dir: Path, *extra: str, **keys: str) -> list[str]:
    """Overrides turning the cache on (Hydra's dict syntax: the node is null until it is set)."""
    node = ",".join(f"{k}:{v}" for k, v in {"dir": str(cache_dir), **keys}.items())
    return [*BASE, f"teacher.cache={{{node}}}", *extra]


def losses(run_dir: Path) -> list[dict[str, float]]:
    """Every logged training value (loss terms, objectives, π, diagnostics) of every step, in order."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in ln.items() if k.startswith(("loss/", "objective/", "pi/", "grad/"))}
            for ln in lines if ln.get("kind") == "train"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(run_dir / "last.pt")["trainable"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k, v in wa.items():
        assert torch.equal(v, wb[k]), k


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("live")
    run(BASE, d)
    return d


def test_fp32_cache_is_bit_identical_to_the_live_teacher(live: Path, tmp_path: Path) -> None:
    fill = run(cached(tmp_path / "cache"), tmp_path / "fill")  # fills the cache (first run)
    (entry,) = [p for p in (tmp_path / "cache").iterdir()]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["info"]["batch_invariant"], "the test's teacher must be batch-invariant for exactness"
    assert meta["arrays"]["logits"]["shape"] == [64, 18, 4]
    found = run(cached(tmp_path / "cache"), tmp_path / "found")  # finds it filled
    assert fill["steps"] == found["steps"] == 2 * STEPS_PER_EPOCH
    ref = losses(live)
    assert len(ref) == 2 * STEPS_PER_EPOCH and "loss/kl" in ref[0]
    assert losses(tmp_path / "fill") == ref
    assert losses(tmp_path / "found") == ref
    assert_same_weights(live, tmp_path / "fill")
    assert_same_weights(live, tmp_path / "found")
    assert fill["final"] == found["final"] == json.loads((live / "results.json").read_text())["final"]


def test_fp16_cache_is_within_the_documented_rounding(live: Path, tmp_path: Path) -> None:
    run(cached(tmp_path / "cache", "trainer.epochs=1", dtype="fp16"), tmp_path / "fp16")
    got, ref = losses(tmp_path / "fp16"), losses(live)[:STEPS_PER_EPOCH]
    assert len(got) == STEPS_PER_EPOCH
    # Step 0 (same student weights): the KL term differs only through the teacher's logits, each
    # rounded to fp16 (relative 2^-11); KL at T=4 moves far less than 1e-3 of its value under that.
    assert got[0]["loss/ce"] == ref[0]["loss/ce"]
    assert got[0]["loss/kl"] == pytest.approx(ref[0]["loss/kl"], rel=1e-3, abs=1e-6)
    # The stored logits themselves: within the bound of the module doc, against the fp32 cache's.
    (entry,) = [p for p in (tmp_path / "cache").iterdir()]
    fp16 = np.load(entry / "logits.npy").astype(np.float64)
    run(cached(tmp_path / "cache32", "trainer.epochs=1", "trainer.max_steps=1"), tmp_path / "fp32")
    (entry32,) = [p for p in (tmp_path / "cache32").iterdir()]
    exact = np.load(entry32 / "logits.npy").astype(np.float64)
    assert np.all(np.abs(fp16 - exact) <= FP16_REL_TOL * np.abs(exact) + FP16_ABS_TOL)


@pytest.mark.parametrize("stop", ["preempted", "max_steps"])
def test_resume_with_the_cache_is_bit_identical(stop: str, live: Path, tmp_path: Path) -> None:
    """Stopped mid-epoch 2 (by a stop signal, or by max_steps, which validates before saving), then resumed:
    the views come from the restored random stream, so the run ends as the uninterrupted one."""
    at = STEPS_PER_EPOCH + 1
    # PauseAt: a zero loss term (no effect on the numbers) that sends SIGTERM at step `at`.
    pause = ["+distill.pause._target_=tests.distributed.helpers.PauseAt", f"+distill.pause.at={at}",
             f"+distill.pause.marker={tmp_path / 'marker'}", "+distill.pause.mode=signal_self"]
    extra = pause if stop == "preempted" else []
    part = run(cached(tmp_path / "cache", *extra, *([f"trainer.max_steps={at}"] if stop == "max_steps" else [])),
               tmp_path / "run")
    assert part["steps"] == at + (stop == "preempted")  # the stop lands at the next step boundary
    resumed = run(cached(tmp_path / "cache", *extra, "trainer.resume=auto"), tmp_path / "run")
    assert resumed["steps"] == 2 * STEPS_PER_EPOCH
    assert_same_weights(live, tmp_path / "run")
    assert resumed["final"] == json.loads((live / "results.json").read_text())["final"]


def test_a_mismatched_cache_is_an_error(tmp_path: Path) -> None:
    run(cached(tmp_path / "cache", "trainer.max_steps=1"), tmp_path / "a")
    (entry,) = [p for p in (tmp_path / "cache").iterdir()]
    meta = json.loads((entry / "meta.json").read_text())
    meta["key"]["teacher"]["state_sha256"] = "0" * 64  # as if filled from another checkpoint
    (entry / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match=r"does not match this run.*teacher: cache has"):
        run(cached(tmp_path / "cache", "trainer.max_steps=1"), tmp_path / "b")
    # Another teacher (seed) is another key: another directory, never the stale one.
    run(cached(tmp_path / "cache", "trainer.max_steps=1", "seed=4"), tmp_path / "c")
    assert len(list((tmp_path / "cache").iterdir())) == 2
    # A damaged array is caught by its checksum.
    (entry2,) = [p for p in (tmp_path / "cache").iterdir() if p != entry]
    with open(entry2 / "logits.npy", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\xc0\x7f")
    with pytest.raises(CacheError, match="sha256"):
        run(cached(tmp_path / "cache", "trainer.max_steps=1", "seed=4"), tmp_path / "d")


def test_fill_false_and_a_leftover_partial_fill_are_errors(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="teacher.cache.fill=false"):
        run(cached(tmp_path / "cache", fill="false"), tmp_path / "a")
    (tmp_path / "cache").mkdir(exist_ok=True)
    cfg = compose_cfg(cached(tmp_path / "cache"))
    from kdrun.config import TrainerConfig, validate
    from kdrun.engine.build import build

    validate(cfg)
    t = TrainerConfig(**cfg.trainer)
    from unittest import mock

    import kdrun.teacher_cache.orchestrate as B

    real = B.cache_key_and_path
    seen: dict[str, Path] = {}

    def with_partial(*a: Any, **k: Any) -> Any:
        key, path = real(*a, **k)
        partial = seen["partial"] = path.with_name(path.name + ".partial")
        partial.mkdir(parents=True)
        os.utime(partial, (time.time() - 3600, time.time() - 3600))  # killed an hour ago: no heartbeat since
        return key, path

    # A fill killed midway is never overwritten nor used: the run stops naming the directory to delete.
    with pytest.raises(CacheError, match=r"no progress for \d+ s, so it was killed.*Delete"):
        with mock.patch.object(B, "cache_key_and_path", with_partial):
            build(cfg, t, torch.device("cpu"), 3)
    assert seen["partial"].is_dir()


def test_a_run_that_loses_the_race_to_fill_waits_for_the_winner(tmp_path: Path) -> None:
    """Two runs of a sweep find the cache missing; the one whose create comes second (fill_cache -> False)
    waits for the other's fill and then trains on that cache."""
    from unittest import mock

    import kdrun.teacher_cache.orchestrate as B

    first = tmp_path / "first"
    run(cached(tmp_path / "cache", "trainer.max_steps=1"), first)  # the winner: its cache is in place
    waited: list[Path] = []
    with mock.patch.object(B, "cache_state", lambda path: "missing"), \
            mock.patch.object(B, "fill_cache", lambda *a, **k: False), \
            mock.patch.object(B, "wait_for_fill", lambda path, say=None: waited.append(path)):
        run(cached(tmp_path / "cache", "trainer.max_steps=1"), tmp_path / "second")
    assert len(waited) == 1 and (waited[0] / "meta.json").is_file()
    assert losses(tmp_path / "second") == losses(first)


@pytest.mark.parametrize("extra, keys, match", [
    (["+dataset.augment=resized_crop"], {}, "RandomResizedCrop, which is continuous"),
    ([], {"dtype": "bf16"}, r"teacher.cache.dtype='bf16' is not a valid choice; valid choices are 'fp32', 'fp16'"),
    ([], {"dtyp": "fp16"}, "did you mean teacher.cache.dtype"),
])
def test_refused_configs_name_the_problem(extra: list[str], keys: dict[str, str], match: str,
                                          tmp_path: Path) -> None:
    overrides = cached(tmp_path / "cache", *extra, **keys)
    with pytest.raises(ConfigError, match=match):
        run(overrides, tmp_path / "run")


def test_mixup_is_refused(tmp_path: Path) -> None:
    from kdrun.data.views import ContinuousAugmentationError
    from kdrun.teacher_cache import orchestrate as B

    data = tiny_cifar()
    data.mixup = lambda x, y: (x, y)
    with pytest.raises(ContinuousAugmentationError, match="mixup/cutmix"):
        cfg = compose_cfg(cached(tmp_path / "cache"))
        from kdrun.config import TrainerConfig

        B.build_teacher_cache(cfg, TrainerConfig(**cfg.trainer), data, object(), None,  # type: ignore[arg-type]
                              torch.device("cpu"))


def test_cache_teacher_command_fills_once_and_the_run_finds_it(capsys: pytest.CaptureFixture[str],
                                                              tmp_path: Path) -> None:
    from kdrun.commands.cache_teacher import main

    overrides = cached(tmp_path / "cache")
    assert main(overrides) == 0
    assert "teacher cache filled" in capsys.readouterr().out
    (entry,) = [p for p in (tmp_path / "cache").iterdir()]
    stamp = (entry / "meta.json").stat().st_mtime_ns
    assert main(overrides) == 0
    out = capsys.readouterr().out
    assert f"up to date: {entry}" in out and "64 images × 18 views" in out and "exact" in out
    run([*overrides, "trainer.max_steps=1"], tmp_path / "run")  # same key: the run uses it, no refill
    assert [p for p in (tmp_path / "cache").iterdir()] == [entry]
    assert (entry / "meta.json").stat().st_mtime_ns == stamp
    # A damaged cache: exit 2 with the reason.
    with open(entry / "logits.npy", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\xc0\x7f")
    assert main(overrides) == 2
    assert "sha256" in capsys.readouterr().err
    # Continuous augmentation: exit 2, named.
    assert main([*overrides, "+dataset.augment=resized_crop"]) == 2
    assert "RandomResizedCrop" in capsys.readouterr().err
