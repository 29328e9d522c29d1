"""``kdrun eval``: rebuild the student and the val split from a checkpoint's stored config, report its
val metrics (the task's: top-1/top-5 or COCO AP), its number of parameters and its inference throughput.

Throughput (``images_per_s``) is measured in a second pass over the val split, after the metrics pass
(which also warms the kernels and, on CUDA, cuDNN's algorithm choice for the val shapes up):

* timed: the model forward under ``torch.inference_mode()`` and the stored ``trainer.precision``'s
  autocast, plus the task's post-processing (detection: Deformable DETR's top-k + box scaling,
  :meth:`kdrun.tasks.detection.Detection.postprocess`; classification: softmax + top-5), with
  ``torch.cuda.synchronize()`` before and after each batch on CUDA;
* not timed: waiting for the data loader and the host→device copy (``images_per_s_with_loading``
  reports the rate with them, over the same batches);
* the first ``warmup_batches`` batches are run but not timed; the timed batches are one pass over the
  val split after them (at least ``min_timed_batches``, cycling the split when it is that small, at most
  ``max_batches``).

The batch size is the val loader's (``trainer.val_batch_size``, 0 → 2 × ``trainer.batch_size``) unless
``throughput_batch_size`` is given (papers' FPS figures are often batch 1); the device, precision and
batch size are returned with the figure.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kdrun.runtime import checkpoint as ckpt
from kdrun.config import ConfigError, validate
from kdrun.data.loaders import close_loaders, make_loaders
from kdrun.engine import autocast, evaluate, pick_device
from kdrun.engine.environment import set_backend_flags
from kdrun.runtime.logger import format_metrics, format_value
from kdrun.models.build import CheckpointError, build_model, extract_state_dict
from kdrun.models.taps import ModelOutput

TIMED = "forward + post-processing (data loading and host-to-device copy excluded)"
# keys evaluate_checkpoint adds to the task's metrics
EXTRA_KEYS = ("checkpoint", "checkpoint_from_run_dir", "checkpoint_epoch", "checkpoint_step", "checkpoint_logged",
              "model", "params", "images_per_s", "images_per_s_with_loading",
              "throughput_batch_size", "throughput_batches", "throughput_images", "throughput_warmup_batches",
              "throughput_device", "throughput_precision", "throughput_timed")


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself, or for a run directory its ``best.pt`` (the best val epoch's weights), else its
    ``last.pt`` (the final weights, which the end-of-run summary's "final" figures are of)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(
            f"{p} is a directory without best.pt or last.pt: give a run directory that holds one of them, or "
            "the path of a checkpoint file"
            + (f" (e.g. the previous last.pt kept beside it: {p / 'last.pt.prev'})." if (p / "last.pt.prev").is_file()
               else " (a run that stopped before its first checkpoint has none).")
        )
    return p


def count_params(model: nn.Module) -> int:
    """Every parameter of the model (trainable or not), as the papers' Params column."""
    return sum(p.numel() for p in model.parameters())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def topk_postprocess(out: Any, targets: Any, k: int = 5) -> tuple[Tensor, Tensor]:
    """Classification's post-processing: class probabilities and the top-k classes."""
    logits = out.logits if isinstance(out, ModelOutput) else out
    return logits.float().softmax(-1).topk(min(k, logits.shape[-1]), dim=-1)


def measure_throughput(model: nn.Module, loader: DataLoader, task: Any, device: torch.device,
                       precision: str = "fp32", channels_last: bool = False, warmup_batches: int = 5,
                       max_batches: int | None = None, min_timed_batches: int = 5) -> dict[str, Any]:
    """Inference images/s of ``model`` on ``loader`` (see the module docstring for what is timed)."""
    if warmup_batches < 0 or min_timed_batches < 1 or (max_batches is not None and max_batches < 1):
        raise ValueError("warmup_batches must be >= 0, min_timed_batches and max_batches >= 1")
    post = getattr(task, "postprocess", None) or topk_postprocess
    n_timed = max(len(loader) - warmup_batches, min_timed_batches)
    if max_batches is not None:
        n_timed = min(n_timed, max_batches)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    was_training = model.training
    model.eval()
    seen = timed = images = 0
    compute_s = loading_s = 0.0
    try:
        with torch.inference_mode():
            while timed < n_timed:
                it = iter(loader)
                try:
                    while timed < n_timed:
                        t0 = time.perf_counter()
                        try:
                            batch = next(it)
                        except StopIteration:
                            break
                        x, y, _ = task.batch_to_device(batch, device)
                        if channels_last:
                            if isinstance(x, Tensor):
                                x = x.contiguous(memory_format=torch.channels_last)
                            elif isinstance(getattr(x, "tensors", None), Tensor):
                                x.tensors = x.tensors.contiguous(memory_format=torch.channels_last)
                        sync()
                        t1 = time.perf_counter()
                        with autocast(device, precision):
                            out = model(x)
                        post(out, y)
                        sync()
                        t2 = time.perf_counter()
                        if seen >= warmup_batches:
                            compute_s += t2 - t1
                            loading_s += t1 - t0
                            images += task.batch_size(x)
                            timed += 1
                        seen += 1
                finally:
                    shutdown = getattr(it, "_shutdown_workers", None)
                    if shutdown is not None:
                        shutdown()
                if seen == 0:
                    raise ValueError("the val loader yields no batches")
    finally:
        model.train(was_training)
    return {
        "images_per_s": images / max(compute_s, 1e-12),
        "images_per_s_with_loading": images / max(compute_s + loading_s, 1e-12),
        "throughput_batch_size": int(loader.batch_size or 1),
        "throughput_batches": timed,
        "throughput_images": images,
        "throughput_warmup_batches": warmup_batches,
        "throughput_device": device_name(device),
        "throughput_precision": precision,
        "throughput_timed": TIMED,
    }


def evaluate_checkpoint(path: str | Path, overrides: list[str] = (), device: str | None = None, *,
                        throughput: bool = True, warmup_batches: int = 5, max_batches: int | None = None,
                        throughput_batch_size: int | None = None,
                        detections_path: str | Path | None = None) -> dict[str, Any]:
    """The task's val metrics of the checkpoint's student (as the run logged them), plus ``params``
    and, with ``throughput``, the inference rate (``images_per_s`` and the ``throughput_*`` facts).
    ``detections_path``: where a task that saves its predictions (detection: COCO results json, the
    input of ``kdrun tide``) writes them."""
    p = resolve_checkpoint(path)
    state = ckpt.load(p)
    cfg = OmegaConf.create(state["config"])
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:
        raise ConfigError(f"bad override in {list(overrides)}: {str(e).splitlines()[0]}") from None
    trainer = validate(cfg).trainer
    dev = pick_device(device or trainer.accelerator)
    set_backend_flags(trainer, dev)  # the engine's settings, so that the metrics match the run's
    data = instantiate(cfg.dataset, _convert_="all")
    task = instantiate(cfg.task, _convert_="all")
    model = build_model(OmegaConf.create({"model": cfg.student.model, "checkpoint": None}))
    model.load_state_dict(extract_state_dict(state, p))
    model.to(dev)
    if trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    loaders = make_loaders(data, trainer, 0, dev, aux=False, task=task)
    try:
        metrics: dict[str, Any] = dict(evaluate(model, loaders.val, task, dev, trainer.precision, trainer.channels_last,
                                                 results_path=None if detections_path is None
                                                 else Path(detections_path)))
    finally:
        close_loaders(loaders)
    metrics["checkpoint"] = str(p)
    metrics.update(checkpoint_facts(state, from_run_dir=Path(path).expanduser().is_dir()))
    metrics["model"] = str(cfg.student.model.get("_target_", type(model).__name__))
    metrics["params"] = count_params(model)
    if throughput:
        bs = throughput_batch_size or loaders.val.batch_size
        loader = DataLoader(data.val, batch_size=bs, shuffle=False, num_workers=trainer.num_workers,
                            pin_memory=trainer.pin_memory and dev.type == "cuda",
                            collate_fn=data.collate_fn or getattr(task, "collate_fn", None))
        metrics.update(measure_throughput(model, loader, task, dev, trainer.precision, trainer.channels_last,
                                          warmup_batches=warmup_batches, max_batches=max_batches))
    return metrics


def checkpoint_facts(state: dict[str, Any], from_run_dir: bool) -> dict[str, Any]:
    """Which weights were evaluated: the run's epoch and step at the save, and the val metrics the run
    logged for these very weights (its history entry of that step; ``None`` for a mid-epoch save, which
    no validation saw, or a checkpoint without history such as a fitted teacher's)."""
    step = state.get("step")
    logged = next((h for h in state.get("history") or [] if step is not None and h.get("step") == step), None)
    return {"checkpoint_from_run_dir": from_run_dir, "checkpoint_epoch": state.get("epoch"),
            "checkpoint_step": step,
            "checkpoint_logged": None if logged is None else {k: v for k, v in logged.items()
                                                              if k not in ("epoch", "step")}}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return format_value(v)
    return str(v)


def weights_line(m: dict[str, Any]) -> list[str]:
    """Which file was evaluated and what the run logged for it, so that eval and the run's summary
    ("final" = last.pt, "best" = best.pt) can be compared figure for figure."""
    name = Path(str(m.get("checkpoint", ""))).name
    why = {"best.pt": "the best val epoch's weights", "last.pt": "the final weights"}.get(name, "")
    if m.get("checkpoint_from_run_dir"):
        why += (", " if why else "") + "picked from the run dir: best.pt, else last.pt"
    at = ", ".join(f"{k} {m[f'checkpoint_{k}']}" for k in ("epoch", "step") if m.get(f"checkpoint_{k}") is not None)
    lines = [f"  weights  {name}" + (f" ({why})" if why else "") + (f": {at}" if at else "")]
    logged = m.get("checkpoint_logged")
    if logged:
        scores = {k: v for k, v in logged.items() if k not in ("loss", "samples")}
        lines.append(f"           the run logged val {format_metrics(scores)} for these weights")
    elif m.get("checkpoint_step") is not None:
        lines.append("           no val of these weights was logged (saved mid-epoch or between validations)")
    return lines


def format_summary(m: dict[str, Any]) -> str:
    """A readable summary of :func:`evaluate_checkpoint`'s result."""
    counts = ("samples", "images", "detections")
    scores = {k: v for k, v in m.items() if k not in EXTRA_KEYS and k not in counts}
    lines = [f"kdrun eval  {m.get('checkpoint', '')}  ({m.get('model', '?')})", *weights_line(m)]
    n = ", ".join(f"{int(m[k])} {k}" for k in counts if k in m and isinstance(m[k], (int, float)))
    lines.append("  val      " + "   ".join(f"{k} {_fmt(v)}" for k, v in scores.items())
                 + (f"   ({n})" if n else ""))
    if "params" in m:
        lines.append(f"  params   {m['params'] / 1e6:.2f} M ({m['params']:,})")
    if "images_per_s" in m and math.isfinite(m["images_per_s"]):
        lines.append(f"  speed    {m['images_per_s']:.1f} images/s: {m['throughput_timed']}, batch "
                     f"{m['throughput_batch_size']}, {m['throughput_device']}, {m['throughput_precision']}")
        lines.append(f"           {m['throughput_batches']} batches ({m['throughput_images']} images) timed after "
                     f"{m['throughput_warmup_batches']} warm-up; {m['images_per_s_with_loading']:.1f} images/s "
                     "with data loading and copy")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """``kdrun eval``: the command line of :func:`evaluate_checkpoint`."""
    p = argparse.ArgumentParser(prog="kdrun eval", description="Evaluate a kdrun checkpoint on its data set's val "
                                "split, with the config stored in the checkpoint: the task's metrics (top-1/top-5, "
                                "or COCO AP/AP50/AP75/APs/APm/APl), the student's parameter count and its "
                                "inference throughput (forward + post-processing, data loading excluded).")
    p.add_argument("checkpoint", help="last.pt, best.pt or a run directory (uses best.pt, else last.pt)")
    p.add_argument("overrides", nargs="*", help="key=value changes to the stored config, e.g. dataset.root=/data")
    p.add_argument("--device", default=None, help="cpu | cuda (default: the stored trainer.accelerator)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput pass")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="batch size of the throughput pass (default: the val loader's; the metrics pass always "
                        "uses the stored trainer.val_batch_size)")
    p.add_argument("--warmup", type=int, default=5, metavar="N", help="warm-up batches not timed (default 5)")
    p.add_argument("--max-batches", type=int, default=None, metavar="N",
                   help="time at most N batches (default: one pass over the val split)")
    p.add_argument("--save-detections", default=None, metavar="PATH",
                   help="detection: write the val detections (COCO results json) to PATH")
    a = p.parse_args(argv)
    if a.warmup < 0 or (a.batch_size is not None and a.batch_size < 1) or (a.max_batches is not None
                                                                           and a.max_batches < 1):
        p.error("--warmup must be >= 0, --batch-size and --max-batches >= 1")
    metrics = evaluate_checkpoint(a.checkpoint, a.overrides, a.device, throughput=not a.no_throughput,
                                  warmup_batches=a.warmup, max_batches=a.max_batches,
                                  throughput_batch_size=a.batch_size, detections_path=a.save_detections)
    if a.json:
        print(json.dumps(metrics))
    else:
        print(format_summary(metrics))
