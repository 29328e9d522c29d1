"""``kdrun eval``: rebuild the student and the val split from a checkpoint's stored config."""
from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from kdrun import checkpoint as ckpt
from kdrun.config import ConfigError, validate
from kdrun.engine import close_loaders, evaluate, make_loaders, pick_device
from kdrun.config import TrainerConfig
from kdrun.models.build import CheckpointError, build_model, extract_state_dict


def resolve_checkpoint(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p} holds neither best.pt nor last.pt.")
    return p


def evaluate_checkpoint(path: str | Path, overrides: list[str] = (), device: str | None = None) -> dict:
    p = resolve_checkpoint(path)
    state = ckpt.load(p)
    cfg = OmegaConf.create(state["config"])
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:
        raise ConfigError(f"bad override in {list(overrides)}: {str(e).splitlines()[0]}") from None
    validate(cfg)
    t = TrainerConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))
    dev = pick_device(device or t.accelerator)
    data = instantiate(cfg.dataset, _convert_="all")
    task = instantiate(cfg.task, _convert_="all")
    model = build_model(OmegaConf.create({"model": cfg.student.model, "checkpoint": None}))
    model.load_state_dict(extract_state_dict(state, p))
    model.to(dev)
    loaders = make_loaders(data, t, 0, dev, aux=False, task=task)
    try:
        return evaluate(model, loaders.val, task, dev, t.precision, t.channels_last)
    finally:
        close_loaders(loaders)
