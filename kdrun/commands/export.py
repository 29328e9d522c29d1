"""``kdrun export RUN_DIR``: the student alone, as a state_dict the plain model loads.

What is written (default ``RUN_DIR/export/``):

* ``student.pth`` — the bare student's ``state_dict`` (no projector, no loss modules, no teacher,
  no ``module.``/``model.`` prefixes), saved with ``torch.save``; it loads with
  ``model.load_state_dict(torch.load(path, weights_only=True))`` into the model the config builds, and
  for timm students with ``timm.create_model(name, num_classes=..., checkpoint_path=path)``.
* ``student.yaml`` — the student's model config (its ``_target_`` and arguments), so that the model can
  be rebuilt with ``hydra.utils.instantiate`` without kdrun's training config.
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


def export_student(run_dir: str | Path, out: str | Path | None = None, which: str = "best") -> Path:
    """Write ``student.pth`` and ``student.yaml``; return the directory."""
    if out:
        check_out_dir(Path(out))
    run_dir = Path(run_dir)
    path = run_dir / f"{which}.pt" if run_dir.is_dir() and (run_dir / f"{which}.pt").is_file() \
        else resolve_checkpoint(run_dir)
    state = ckpt.load(path)
    sd = {k: v.clone() for k, v in extract_state_dict(state, path).items()}
    cfg = OmegaConf.create(state["config"])
    out_dir = Path(out) if out else (path.parent / "export")
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
    p.add_argument("--out", default=None, help="output directory (default: <run>/export)")
    a = p.parse_args(argv)
    try:
        out = export_student(a.run, a.out, a.which)
    except ExportError as e:
        fail(str(e))
    n = sum(v.numel() for v in torch.load(out / "student.pth", weights_only=True).values())
    print(f"kdrun: exported the student ({n / 1e6:.2f}M values) to {out / 'student.pth'} "
          f"(model config: {out / 'student.yaml'})")
    return 0
