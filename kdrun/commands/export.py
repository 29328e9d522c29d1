"""``kdrun export RUN_DIR``: the student alone, as a state_dict the plain model loads.

What is written (default ``RUN_DIR/export/``):

* ``student.pth`` — the bare student's ``state_dict`` (no projector, no loss modules, no teacher,
  no ``module.``/``model.`` prefixes), saved with ``torch.save``; it loads with
  ``model.load_state_dict(torch.load(path, weights_only=True))`` into the model the config builds, and
  for timm students with ``timm.create_model(name, num_classes=..., checkpoint_path=path)``.
* ``student.yaml`` — the student's model config (its ``_target_`` and arguments), so that the model can
  be rebuilt with ``hydra.utils.instantiate`` without kdrun's training config.

``--ema`` writes the same two files from the student's EMA weights instead (a run with ``trainer.ema``;
:mod:`kdrun.engine.ema`), by default into ``RUN_DIR/export_ema/``. ``best.pt`` holds the EMA as it was at the
raw student's best epoch (the checkpoint's one choice of epoch, as DeiT's best_checkpoint.pth holds its
``model_ema``); ``--which last`` gives the final EMA.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kdrun.runtime import checkpoint as ckpt
from kdrun.errors import fail
from kdrun.commands.evaluate import resolve_checkpoint
from kdrun.models.build import extract_state_dict


class ExportError(ValueError):
    """An export that cannot be written where it was asked to; the message is meant for the user."""


def check_out_dir(out: Path) -> None:
    """``--out`` must be a directory or creatable as one: checked before the checkpoint is read, so a
    mistyped path costs nothing (``mkdir`` would fail with a bare FileExistsError/NotADirectoryError)."""
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "is an existing file" if blocker == out else f"is under {blocker}, which is a file"
        raise ExportError(f"--out {out} {where}; export writes a directory (student.pth, student.yaml): "
                          "pass a directory path (it is created if missing).")


def ema_state(state: dict, path: Path) -> dict:
    """The checkpoint's EMA entry (:meth:`kdrun.engine.ema.StudentEma.state_dict`), or the one-paragraph refusal."""
    node = state.get("ema")
    if not isinstance(node, dict):
        raise ExportError(f"{path} holds no EMA weights: that run was trained with trainer.ema=null. Export its raw "
                          "student without --ema, or train with an EMA (trainer.ema={decay:0.9998}) to export one.")
    return node


def export_student(run_dir: str | Path, out: str | Path | None = None, which: str = "best", ema: bool = False) -> Path:
    """Write ``student.pth`` and ``student.yaml`` (``ema``: of the EMA weights); return the directory."""
    if out:
        check_out_dir(Path(out))
    run_dir = Path(run_dir)
    path = run_dir / f"{which}.pt" if run_dir.is_dir() and (run_dir / f"{which}.pt").is_file() \
        else resolve_checkpoint(run_dir)
    state = ckpt.load(path)
    sd = {k: v.clone() for k, v in extract_state_dict(ema_state(state, path) if ema else state, path).items()}
    cfg = OmegaConf.create(state["config"])
    out_dir = Path(out) if out else (path.parent / ("export_ema" if ema else "export"))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a read-only file system
        raise ExportError(f"cannot create the export directory {out_dir} ({e.strerror or e}); pass a "
                          "writable --out.") from None
    ckpt.save_atomic(sd, out_dir / "student.pth")
    (out_dir / "student.yaml").write_text(OmegaConf.to_yaml(cfg.student.model, resolve=True))
    return out_dir


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kdrun export", description="Export the student of a run as a plain "
                                "state_dict (no projector, no teacher) plus its model config.")
    p.add_argument("run", help="run directory or checkpoint file")
    p.add_argument("--which", choices=("best", "last"), default="best", help="which checkpoint of a run dir")
    p.add_argument("--out", default=None, help="output directory (default: <run>/export, with --ema <run>/export_ema)")
    p.add_argument("--ema", action="store_true", help="the student's EMA weights (a run with trainer.ema) "
                   "instead of the raw ones")
    a = p.parse_args(argv)
    try:
        out = export_student(a.run, a.out, a.which, ema=a.ema)
    except ExportError as e:
        fail(str(e))
    n = sum(v.numel() for v in torch.load(out / "student.pth", weights_only=True).values())
    what = "the student's EMA weights" if a.ema else "the student"
    print(f"kdrun: exported {what} ({n / 1e6:.2f}M values) to {out / 'student.pth'} "
          f"(model config: {out / 'student.yaml'})")
    return 0
