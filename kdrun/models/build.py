"""Build the teacher and the student from their config nodes, and load their weights.

A role node (``student``/``teacher``) is ``{model: <_target_ node>, checkpoint: PATH|null, ...}``.
``model`` is instantiated with Hydra (any callable returning an ``nn.Module``: a timm model through
``timm.create_model`` with ``pretrained``/``checkpoint_path``/``num_classes``, a CIFAR-zoo
constructor, :class:`kdrun.models.convnet.ConvNet`). ``checkpoint`` loads local weights and accepts:

* a kdrun checkpoint (``last.pt``/``best.pt``/an export): its ``student`` state_dict;
* a benchmark checkpoint (CRD/RepDistiller, mdistiller, DeiT): a dict with ``model`` (or
  ``state_dict``) holding the state_dict;
* a bare state_dict.

``module.`` prefixes (DDP) are stripped. Loading is strict: a mismatch names the missing and unexpected
keys, which is how a checkpoint of another architecture is caught.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class CheckpointPermissionError(CheckpointError):
    """A checkpoint this user may not read: nothing is wrong with the file, so no other one is suggested."""


class CheckpointUnreadable(CheckpointError):
    """A checkpoint file whose bytes are not a checkpoint (empty, truncated, corrupted, another format).
    ``path`` and ``why`` let a caller that knows where the file came from (a resume, the teacher cache)
    give its own way on instead of the generic one."""

    def __init__(self, message: str, path: Path, why: str) -> None:
        super().__init__(message)
        self.path, self.why = path, why


# Where a run keeps its checkpoints (kdrun.runtime.checkpoint: last.pt rotates into last.pt.prev): the files to
# name when one of them is given where a file is expected but cannot be used.
RUN_CHECKPOINTS = ("best.pt", "last.pt", "last.pt.prev")


def other_checkpoints(path: Path) -> list[Path]:
    """The run's other checkpoints beside ``path`` (a good copy to use instead of a damaged one)."""
    return [q for q in (path.with_name(n) for n in RUN_CHECKPOINTS) if q != path and q.is_file()]


def first_line(e: BaseException, most: int = 160) -> str:
    """``Type: first sentence`` of an exception for a one-paragraph message (torch's zip reader adds a
    long paragraph about miniz after the first sentence; an empty message is just the type)."""
    text = str(e).strip()
    text = text.splitlines()[0] if text else ""
    text = text.split(". ")[0].rstrip(".")
    text = text if len(text) <= most else text[: most - 1] + "…"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def not_a_file_message(path: Path) -> str:
    """A directory (or a device, a socket) given where a checkpoint file is expected: name the file to give."""
    if path.is_dir():
        inside = [path / n for n in RUN_CHECKPOINTS if (path / n).is_file()]
        return (f"checkpoint {path} is a directory, not a checkpoint file; "
                + (f"give the checkpoint file in it, e.g. {inside[0]}." if inside else
                   f"it holds no {' or '.join(RUN_CHECKPOINTS[:2])}: give the path of a checkpoint file."))
    return f"checkpoint {path} is not a regular file; give the path of a checkpoint file."


def load_file(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file and say what is wrong with it:
    missing, a directory, not readable by this user (permissions: the file is fine), or not a readable
    checkpoint (:class:`CheckpointUnreadable`: empty, truncated, corrupted)."""
    path = Path(path).expanduser()
    try:
        os.stat(path)  # not Path.is_file(), which reports a directory without search permission as missing
        if not path.is_file():
            raise CheckpointError(not_a_file_message(path))
        if path.stat().st_size == 0:  # torch's own error for it is an empty message
            raise CheckpointUnreadable(unreadable_message(path, EMPTY), path, EMPTY)
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist.") from None
    except PermissionError as e:
        raise CheckpointPermissionError(
            f"checkpoint {path} cannot be read: permission denied ({e.filename or path}). The file itself may be "
            "fine: give this user read access (and search access to its directories), e.g. chmod u+r, or run "
            "as its owner.") from None
    except CheckpointError:
        raise
    except Exception as e:
        why = first_line(e)
        raise CheckpointUnreadable(unreadable_message(path, why), path, why) from None


EMPTY = "0 bytes"  # CheckpointUnreadable.why of an empty file


def damage(path: Path, why: str) -> str:
    """The sentence that says a checkpoint file is damaged (the first of every such message)."""
    if why == EMPTY:
        return f"checkpoint {path} is empty (0 bytes): a save or a copy of it did not finish."
    return f"checkpoint {path} cannot be read ({why}); it is truncated, corrupted or not a torch checkpoint."


def unreadable_message(path: Path, why: str) -> str:
    """The generic way on for a damaged checkpoint: a good copy, or the run's other checkpoints."""
    others = other_checkpoints(path)
    return damage(path, why) + (" Use a good copy of it, or another checkpoint of the same run: "
                                + ", ".join(str(q) for q in others) + " (untouched)." if others
                                else " Use a good copy of it.")


def extract_state_dict(obj: Any, path: str | os.PathLike = "<checkpoint>") -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("student", "model", "state_dict", "model_ema"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state_dict (looked for keys student, model, state_dict).")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def show_keys(keys: list[str], most: int = 8) -> str:
    """The first ``most`` keys of a list for an error message, with the total when there are more."""
    return ", ".join(keys[:most]) + (f" … ({len(keys)} in all)" if len(keys) > most else "")


def state_dict_mismatch(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]
                        ) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape mismatches as "key (ckpt) vs (model)") of ``sd`` against ``own``."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in sd and sd[k].shape != v.shape]
    return missing, unexpected, shapes


def check_fits(model: nn.Module, sd: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` naming missing, unexpected and mis-shaped keys."""
    missing, unexpected, shapes = state_dict_mismatch(model.state_dict(), sd)
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(model).__name__}: missing keys [{show_keys(missing)}], "
            f"unexpected keys [{show_keys(unexpected)}], shape mismatches (checkpoint vs model) "
            f"[{show_keys(shapes)}]. Is it a checkpoint of another architecture or class count?"
        )


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    sd = extract_state_dict(load_file(path), path)
    check_fits(model, sd, path)
    model.load_state_dict(sd)


def build_model(node: DictConfig) -> nn.Module:
    """Instantiate ``node.model`` and load ``node.checkpoint`` if set."""
    model = instantiate(node.model, _convert_="all")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{node.model._target_} returned {type(model).__name__}, not an nn.Module")
    if node.get("checkpoint"):
        load_weights(model, node.checkpoint)
    return model
