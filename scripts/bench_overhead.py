#!/usr/bin/env python
"""Framework overhead: the same KD job as a bare PyTorch loop, through kdrun's engine, and through
torchdistill's ``DistillationBox``, interleaved over rounds in one process (issue #16).

The job (the CIFAR-100 KD recipe ``recipes/cifar100_resnet56_resnet20_kd.yaml`` on synthetic data):
resnet56 → resnet20 (randomly initialised: timing only), CIFAR-shaped synthetic images
(``kdrun.data.synthetic``, 100 classes, 3×32×32), batch 64, loss 0.9·T²·KL(T = 4) + 0.1·CE (the
``fixed_kd`` balancer), SGD lr 0.05, momentum 0.9, weight decay 5e-4, fp32, ``num_workers=0``.

* ``bare`` — the loop a user would write: teacher under ``torch.inference_mode``, student forward,
  loss, ``zero_grad``/``backward``/``step``.
* ``kdrun`` — ``kdrun.engine.train`` on the same job with the default logger settings (``log_every``
  10, jsonl + TensorBoard; only the progress bar is off). Steps are timed from outside: the step object
  that ``kdrun.engine.run.make_step`` returns is wrapped so that each call's end time is recorded
  (nothing is read back from ``metrics.jsonl``), so the loader, the loop and the logger between steps
  are all charged to kdrun.
* ``torchdistill`` — ``DistillationBox`` with a ``train_config`` dict equivalent to torchdistill's KD
  sample config (yoshitomo-matsubara/torchdistill ``configs/sample/cifar10/kd/
  resnet20_from_densenet_bc_k12_depth100-final_run.yaml``: ``KDLoss`` with ``temperature``/``alpha``
  inside ``WeightedSumLoss``), ``alpha=0.1, beta=0.9`` for the same loss; its own data loader
  (``requires_supp``), ``forward_process`` + ``post_forward_process`` per step as in its
  ``examples/torchvision/image_classification.py``. Skipped, with a note, when torchdistill is not
  importable.

With ``--cached`` four more variants run on a finite-view pipeline (``kdrun.data.views``: a torchvision
CIFAR100 object over ``--cache-images`` random uint8 images with kdrun's CIFAR transform — 4-pixel-padded
crop + flip = 162 views): ``bare-views`` / ``kdrun-views`` (live teacher) and ``bare-cached`` /
``kdrun-cached`` (the teacher's outputs read from a ``kdrun.teacher_cache``: the bare loop's filled with
``build_cache`` before the rounds, kdrun's by the engine itself, ``teacher.cache={dir: ...}``, on an
untimed first run). Both fills are timed and reported in units of teacher-forward epochs: fill seconds /
(images × the live teacher's per-image forward time in ``bare-views``' steps).

Every variant's step time is the interval between consecutive step ends (data loading included); the
first ``--warmup`` steps of each run are dropped. The table shows the median over all rounds' steps, its
ratio to ``bare``, and the *paired* ratio: per round, the variant's median over ``bare``'s median in the
same round, summarised as median [min, max] over rounds (this VM drifts by ±10 % between minutes; the
paired ratio cancels most of that). ``--threads 1`` is steadier still on a 2-core VM.

``--pair TEACHER:STUDENT`` takes any two ``conf/model`` names (default the recipe's resnet56:resnet20).
``--channels-last true`` runs ``bare`` and ``kdrun`` with both models and the inputs in channels_last
(``trainer.channels_last=true``); ``--channels-last compare`` adds ``bare-cl`` and ``kdrun-cl`` beside the
contiguous ``bare``/``kdrun`` and prints their ratios (issue #16 item 3: a channels_last default only
where it is measured faster for the model family and device). ``--compile compare`` adds ``kdrun`` with
``trainer.compile=true`` and reports the first step's time (the compilation) and after how many steps the
compiled step pays it back. ``--host-memory`` (default ``keep``, kdrun's ``trainer.host_memory`` default)
is applied to the whole process, so every variant runs with the same allocator settings.

    python scripts/bench_overhead.py --rounds 3 --steps 12 --warmup 2 --cached
    python scripts/bench_overhead.py --rounds 5 --steps 20 --only kdrun --channels-last compare
    python scripts/bench_overhead.py --pair wrn_40_2:wrn_40_1 --only bare --channels-last compare
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler

from kdrun.data.base import DataModule
from kdrun.data.synthetic import build as synthetic
from kdrun.engine.environment import keep_host_memory
from kdrun.losses.kl import kl_divergence
from kdrun.models.taps import ModelOutput

CLASSES, SIZE, T_KD, W_KD, W_CE = 100, 32, 4.0, 0.9, 0.1
SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
PAIR = ["resnet56", "resnet20"]  # teacher, student: conf/model/<name>.yaml (--pair)
HOST_MEMORY = ["keep"]  # --host-memory: the same for every variant (kdrun's setting is process-wide)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def models(device: torch.device, seed: int,
           channels_last: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    teacher, student = zoo(PAIR[0]).to(device).eval(), zoo(PAIR[1]).to(device).train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if channels_last:  # as kdrun.engine.build does for trainer.channels_last=true
        teacher.to(memory_format=torch.channels_last)
        student.to(memory_format=torch.channels_last)
    return teacher, student


def zoo(name: str) -> torch.nn.Module:
    """The model ``conf/model/<name>.yaml`` defines (the one kdrun's ``teacher=``/``student=`` build)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from kdrun.cli import config_dir

    node = OmegaConf.load(Path(config_dir()) / "model" / f"{name}.yaml")
    node.num_classes, node.in_chans = CLASSES, 3
    return instantiate(node)


def data(steps: int, batch: int) -> Any:
    return synthetic(num_classes=CLASSES, image_size=SIZE, train_size=batch * steps, val_size=batch).train


def kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return W_KD * kl_divergence(s_logits, t_logits, T_KD) + W_CE * F.cross_entropy(s_logits, y)


# -- the variants: each returns the end time of every step -------------------------------------------


def run_bare(steps: int, batch: int, device: torch.device, loader: DataLoader | None = None,
             teacher_out: Callable[[Any], torch.Tensor] | None = None,
             fwd_times: list[float] | None = None, channels_last: bool = False) -> list[float]:
    """The hand-written loop. ``loader``/``teacher_out`` replace the data and the teacher call (the
    finite-view and cached variants); ``fwd_times`` collects the live teacher's forward times;
    ``channels_last``: models and inputs in that memory format."""
    teacher, student = models(device, 0, channels_last)
    opt = torch.optim.SGD(student.parameters(), **SGD)
    loader = loader or DataLoader(data(steps, batch), batch_size=batch, shuffle=True, drop_last=True)
    ends = []
    for k, b in enumerate(loader):
        if k == steps:
            break
        x, y = b[0].to(device, non_blocking=True), b[1].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if teacher_out is not None:
            t_logits = teacher_out(b)
        else:
            t0 = time.perf_counter()
            with torch.inference_mode():
                t_logits = teacher(x)
            t_logits = t_logits.clone()  # out of inference mode, for autograd
            if fwd_times is not None:
                sync(device)
                fwd_times.append(time.perf_counter() - t0)
        loss = kd_loss(student(x), t_logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        ends.append(time.perf_counter())
    return ends


FIRST_STEP: dict[str, float] = {}  # variant -> seconds of its latest run's first step (compile included)


def run_kdrun(steps: int, batch: int, device: torch.device, channels_last: bool = False,
              data: list[str] | None = None, extra: tuple[str, ...] = (), name: str = "kdrun") -> list[float]:
    """kdrun's engine on the same job; step end times from a wrapper around the engine's step object.
    ``data`` replaces the synthetic data set's overrides (the finite-view variants); ``extra`` adds
    overrides (``teacher.cache={...}``, ``trainer.compile=true``). The first step's duration, from the
    moment the loop asks for the step object, is kept in ``FIRST_STEP[name]``."""
    from hydra import compose, initialize_config_dir

    import kdrun.engine.run as run
    from kdrun.cli import config_dir

    ends: list[float] = []
    real = run.make_step
    made: list[float] = []

    def timed_make_step(*a: Any, **kw: Any) -> Callable[..., Any]:
        step = real(*a, **kw)

        def timed(*sa: Any, **skw: Any) -> Any:
            out = step(*sa, **skw)
            sync(device)
            ends.append(time.perf_counter())
            return out

        made.append(time.perf_counter())
        return _Proxy(step, timed)

    data = data if data is not None else [
        "dataset=synthetic", f"dataset.num_classes={CLASSES}", f"dataset.image_size={SIZE}",
        f"dataset.train_size={batch * steps}", f"dataset.val_size={batch}"]
    overrides = [
        *data, f"teacher={PAIR[0]}", "teacher.checkpoint=null", "teacher.allow_random=true", f"student={PAIR[1]}",
        "distill=kl", "distill.kl.temperature=4.0",
        "balancer=fixed_kd", "optimizer=sgd", f"optimizer.lr={SGD['lr']}", f"optimizer.momentum={SGD['momentum']}",
        f"optimizer.weight_decay={SGD['weight_decay']}", "scheduler=constant", f"trainer.batch_size={batch}",
        f"trainer.max_steps={steps}", "trainer.epochs=1000", "trainer.val_every=1000", "trainer.save_last=false",
        "trainer.save_best=false", f"trainer.accelerator={device.type}", f"trainer.host_memory={HOST_MEMORY[0]}",
        f"trainer.channels_last={str(channels_last).lower()}", "logger.progress=false", *extra,
    ]
    with tempfile.TemporaryDirectory() as d:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        run.make_step = timed_make_step
        try:
            res = run.train(cfg, Path(d))
        finally:
            run.make_step = real
    assert res["steps"] == steps == len(ends), (res["steps"], len(ends))
    FIRST_STEP[name] = ends[0] - made[0]
    return ends


class _Proxy:
    """The engine's step object with its ``__call__`` timed; every other attribute is the step's own."""

    def __init__(self, step: Any, call: Callable[..., Any]) -> None:
        object.__setattr__(self, "_step", step)
        object.__setattr__(self, "_call", call)

    def __call__(self, *a: Any, **kw: Any) -> Any:
        return self._call(*a, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._step, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._step, name, value)


def torchdistill_available() -> str | None:
    try:
        import torchvision.datasets  # noqa: F401  (torchdistill's registry reads sys.modules['torchvision.datasets'])
        from torchdistill.core.distillation import DistillationBox  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means: skip with the reason
        return f"{type(e).__name__}: {e}"
    return None


def run_torchdistill(steps: int, batch: int, device: torch.device) -> list[float]:
    import logging

    import torchvision.datasets  # noqa: F401
    from torchdistill.core.distillation import DistillationBox

    logging.getLogger("torchdistill").setLevel(logging.WARNING)
    teacher, student = models(device, 0)
    train_config = {
        "num_epochs": 1,
        "train_data_loader": {"dataset_id": "train", "requires_supp": True,
                              "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
                              "kwargs": {"batch_size": batch, "num_workers": 0, "drop_last": True}},
        # torchdistill 1.1.5 has no default forward_proc (get_forward_proc_func(None) raises).
        "teacher": {"sequential": [], "frozen_modules": [], "requires_grad": False,
                    "forward_proc": "forward_batch_only"},
        "student": {"adaptations": None, "sequential": [], "frozen_modules": [], "requires_grad": True,
                    "forward_proc": "forward_batch_only"},
        "optimizer": {"key": "SGD", "kwargs": dict(SGD)},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
            "criterion": {"key": "KDLoss", "kwargs": {
                "student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
                "teacher_module_io": "output", "temperature": T_KD, "alpha": W_CE, "beta": W_KD,
                "reduction": "batchmean"}},
            "weight": 1.0}}}},
    }
    box = DistillationBox(teacher, student, {"train": data(steps, batch)}, train_config, device, None, False, 1)
    box.pre_epoch_process(epoch=0)
    ends = []
    for k, (x, y, supp) in enumerate(box.train_data_loader):
        if k == steps:
            break
        x, y = x.to(device), y.to(device)
        loss = box.forward_process(x, y, supp)
        box.post_forward_process(loss=loss)
        sync(device)
        ends.append(time.perf_counter())
    return ends


# -- the finite-view / cached variants ---------------------------------------------------------------


def fake_cifar(n: int, seed: int = 0, augment: bool = True) -> Any:
    """A torchvision CIFAR100 over random uint8 images with kdrun's CIFAR training (or val) transform."""
    from torchvision.datasets import CIFAR100

    from kdrun.data.cifar100 import transforms

    ds = CIFAR100.__new__(CIFAR100)  # no files: __getitem__ reads data/targets/transform only
    rng = np.random.default_rng(seed)
    ds.data = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    ds.targets = [int(v) for v in rng.integers(0, CLASSES, n)]
    ds.classes = [str(c) for c in range(CLASSES)]
    ds.transform, ds.target_transform = transforms(SIZE, augment=True)[0 if augment else 1], None
    return ds


def fake_cifar_data(train_size: int, val_size: int, **_: Any) -> DataModule:
    """The finite-view data set as a kdrun data module: a Hydra ``_target_`` (``__main__.fake_cifar_data``,
    with the synthetic data set's keys), for the engine's ``kdrun-views``/``kdrun-cached`` variants."""
    return DataModule(train=fake_cifar(train_size), val=fake_cifar(val_size, seed=1, augment=False),
                      num_classes=CLASSES, in_chans=3, image_size=SIZE)


class ViewsBench:
    """The live and cached loops over one finite-view data set (bare and through kdrun's engine), and the
    one-off fills: the bare loop's through :func:`kdrun.teacher_cache.build_cache`, the engine's through
    its own ``teacher.cache`` fill (the first ``kdrun-cached`` run, untimed in the rounds)."""

    def __init__(self, n_images: int, batch: int, device: torch.device, fill_batch: int, root: Path) -> None:
        from kdrun.data.views import ViewDataset
        from kdrun.teacher_cache import build_cache, make_key

        self.data, self.batch, self.device = ViewDataset(fake_cifar(n_images)), batch, device
        self.n_images, self.root, self.fill_batch = n_images, root, fill_batch
        teacher, _ = models(device, 0)

        def call(x: torch.Tensor) -> ModelOutput:
            with torch.inference_mode():
                return ModelOutput(teacher(x).clone())

        key = make_key(teacher, self.data, (), "fp32", {"device": device.type, "precision": "fp32",
                                                         "channels_last": False})
        t0 = time.perf_counter()
        self.cache = build_cache(root / "cache", key, call, self.data, batch_size=fill_batch,
                                 prepare=lambda x: x.to(device), progress=sys.stderr.isatty())
        self.fill_s = time.perf_counter() - t0
        self.fwd_times: list[float] = []
        self.engine_fill_s: float | None = None

    def loader(self, steps: int) -> DataLoader:
        sampler = RandomSampler(self.data, num_samples=self.batch * steps)  # several epochs of few images
        return DataLoader(self.data, batch_size=self.batch, sampler=sampler, drop_last=True)

    def live(self, steps: int) -> list[float]:
        return run_bare(steps, self.batch, self.device, self.loader(steps), fwd_times=self.fwd_times)

    def cached(self, steps: int) -> list[float]:
        def lookup(b: Any) -> torch.Tensor:
            return self.cache.get(b[2], b[3], self.device).logits

        return run_bare(steps, self.batch, self.device, self.loader(steps), teacher_out=lookup)

    def engine_data(self) -> list[str]:
        return ["dataset=synthetic", "dataset._target_=__main__.fake_cifar_data", f"dataset.num_classes={CLASSES}",
                f"dataset.image_size={SIZE}", f"dataset.train_size={self.n_images}", f"dataset.val_size={self.batch}"]

    def engine_cache(self) -> tuple[str, ...]:
        return (f"teacher.cache={{dir:{self.root / 'engine'},fill_batch_size:{self.fill_batch}}}",)

    def kdrun_live(self, steps: int) -> list[float]:
        return run_kdrun(steps, self.batch, self.device, data=self.engine_data(), name="kdrun-views")

    def kdrun_cached(self, steps: int) -> list[float]:
        if self.engine_fill_s is None:  # the engine fills its cache on its first run: time that run alone
            t0 = time.perf_counter()
            run_kdrun(1, self.batch, self.device, data=self.engine_data(), extra=self.engine_cache(),
                      name="kdrun-fill")
            self.engine_fill_s = time.perf_counter() - t0
        return run_kdrun(steps, self.batch, self.device, data=self.engine_data(), extra=self.engine_cache(),
                         name="kdrun-cached")


def paired(per_round: dict[str, list[list[float]]], name: str, base: str) -> tuple[float, float, float]:
    """Median, min and max over rounds of (``name``'s round median / ``base``'s round median): each round's
    variants ran back to back, so the ratio cancels most of a shared VM's slow drift."""
    r = [statistics.median(a) / statistics.median(b) for a, b in zip(per_round[name], per_round[base])]
    return statistics.median(r), min(r), max(r)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of every run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--pair", default="resnet56:resnet20", help="TEACHER:STUDENT, names of conf/model/*.yaml")
    p.add_argument("--only", nargs="*", default=None, help="variants to run (bare always runs)")
    p.add_argument("--cached", action="store_true", help="add the finite-view live and cached loops")
    p.add_argument("--cache-images", type=int, default=128, help="images in the cached data set (× 162 views)")
    p.add_argument("--fill-batch", type=int, default=256)
    p.add_argument("--channels-last", choices=("false", "true", "compare"), default="false",
                   help="models and inputs in channels_last (true), or both formats side by side (compare)")
    p.add_argument("--compile", choices=("false", "compare"), default="false",
                   help="compare: add kdrun with trainer.compile=true (torch.compile of the student)")
    p.add_argument("--host-memory", choices=("keep", "release"), default="keep",
                   help="the C library's handling of freed host memory, for every variant (kdrun's "
                        "trainer.host_memory default is keep and applies it to the whole process)")
    a = p.parse_args()
    HOST_MEMORY[0] = a.host_memory
    if a.host_memory == "keep":
        keep_host_memory()
    if a.threads:
        torch.set_num_threads(a.threads)
    PAIR[:] = a.pair.split(":")
    device, batch = torch.device(a.device), a.batch_size
    notes = []
    cl = a.channels_last == "true"
    variants: dict[str, Callable[[int], list[float]]] = {
        "bare": lambda n: run_bare(n, batch, device, channels_last=cl),
        "kdrun": lambda n: run_kdrun(n, batch, device, channels_last=cl),
    }
    if a.channels_last == "compare":
        variants["bare-cl"] = lambda n: run_bare(n, batch, device, channels_last=True)
        variants["kdrun-cl"] = lambda n: run_kdrun(n, batch, device, channels_last=True, name="kdrun-cl")
    if a.compile == "compare":
        variants["kdrun-compile"] = lambda n: run_kdrun(n, batch, device, channels_last=cl,
                                                        extra=("trainer.compile=true",), name="kdrun-compile")
    why = torchdistill_available()
    if why is None:
        variants["torchdistill"] = lambda n: run_torchdistill(n, batch, device)
    else:
        notes.append(f"torchdistill skipped: not importable ({why})")
    with contextlib.ExitStack() as stack:
        if a.cached:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            views = ViewsBench(a.cache_images, batch, device, a.fill_batch, root)
            variants.update({"bare-views": views.live, "bare-cached": views.cached,
                             "kdrun-views": views.kdrun_live, "kdrun-cached": views.kdrun_cached})
        if a.only:
            variants = {k: v for k, v in variants.items()
                        if k == "bare" or k in a.only or k.removesuffix("-cl") in a.only
                        or k.removesuffix("-compile") in a.only}
        per_round: dict[str, list[list[float]]] = {k: [] for k in variants}
        first: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(a.rounds):
            for name, fn in variants.items():
                ends = fn(a.steps + a.warmup)
                per_round[name].append(list(np.diff(ends[a.warmup:])))
                if name in FIRST_STEP:
                    first[name].append(FIRST_STEP.pop(name))
                print(f"round {r + 1}/{a.rounds} {name:14s} {1000 * statistics.median(per_round[name][-1]):8.1f} ms/step",
                      flush=True)
    times = {k: [t for rnd in v for t in rnd] for k, v in per_round.items()}
    base = statistics.median(times["bare"])
    dev = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    print(f"\n### KD overhead — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {dev}, torch {torch.__version__}")
    print(f"`python scripts/bench_overhead.py {shlex.join(sys.argv[1:])}` — {PAIR[0]} → {PAIR[1]}, batch {batch}, "
          f"fp32{', channels_last' if cl else ''}, median of {a.steps - 1} step intervals after {a.warmup} warm-up "
          f"× {a.rounds} interleaved round(s)\n")
    print("| variant | ms/step | img/s | × bare (all steps) | × bare, paired by round: median [min, max] |\n"
          "| --- | ---: | ---: | ---: | --- |")
    for name, ts in times.items():
        m = statistics.median(ts)
        pm, lo, hi = paired(per_round, name, "bare")
        print(f"| {name} | {1000 * m:.1f} | {batch / m:.1f} | {m / base:.3f} | {pm:.3f} [{lo:.3f}, {hi:.3f}] |")

    def ratio(num: str, den: str, label: str) -> None:
        if num in times and den in times:
            pm, lo, hi = paired(per_round, num, den)
            print(f"\n{label}: {statistics.median(times[num]) / statistics.median(times[den]):.3f} "
                  f"(paired by round {pm:.3f} [{lo:.3f}, {hi:.3f}])")

    ratio("kdrun", "torchdistill", "kdrun step / torchdistill step")
    for name in ("bare", "kdrun"):  # < 1: channels_last is faster for this pair on this device
        ratio(f"{name}-cl", name, f"{name}: channels_last step / contiguous step")
    if "kdrun-compile" in times:
        saved = statistics.median(times["kdrun"]) - statistics.median(times["kdrun-compile"])
        extra = statistics.median(first["kdrun-compile"]) - statistics.median(first["kdrun"])
        ratio("kdrun-compile", "kdrun", "kdrun: compiled step / eager step")
        print(f"first step (compile included): {statistics.median(first['kdrun-compile']):.1f} s compiled (per round: "
              f"{', '.join(f'{v:.1f}' for v in first['kdrun-compile'])} s; later rounds may reuse inductor's "
              f"on-disk cache), {statistics.median(first['kdrun']):.2f} s eager; pays back after "
              + (f"{extra / saved:.0f} steps" if saved > 0 else "no number of steps (it is not faster)"))
    if a.cached:
        ratio("bare-views", "bare-cached", "cached step speed-up, bare loop (bare-views / bare-cached)")
        ratio("kdrun-views", "kdrun-cached", "cached step speed-up, kdrun (kdrun-views / kdrun-cached)")
        ratio("torchdistill", "bare-cached", "torchdistill step / bare cached step")
        ratio("torchdistill", "kdrun-cached", "torchdistill step / kdrun cached step")
        ratio("kdrun-cached", "bare-cached", "kdrun cached step / bare cached step")
        fwd = statistics.median(views.fwd_times) / batch  # live teacher forward, s per image
        n, v = len(views.data), views.data.num_views
        print(f"\nlive teacher forward in a training step: {1000 * fwd * batch:.1f} ms per batch of {batch} "
              f"({1 / fwd:.1f} img/s); bare fill: {n} images × {v} views in {views.fill_s:.1f} s "
              f"(batch {a.fill_batch}, {n * v / views.fill_s:.1f} views/s) = "
              f"{views.fill_s / (n * fwd):.1f} teacher-forward epochs")
        if views.engine_fill_s is not None:
            print(f"engine fill (the first kdrun-cached run: build, fill, open, 1 step): {views.engine_fill_s:.1f} s "
                  f"= {views.engine_fill_s / (n * fwd):.1f} teacher-forward epochs")
    for note in notes:
        print(f"\nNote: {note}")


if __name__ == "__main__":
    main()
