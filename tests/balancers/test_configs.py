"""Every balancer config validates against its constructor's signature and builds a Balancer."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kdrun.balancers.base import Balancer
from kdrun.config import ConfigError, validate_target_node
from tests.conftest import compose_cfg

CONF = Path(__file__).resolve().parents[2] / "conf" / "balancer"
# Every option of the group, as Hydra composes it (an option may have a defaults list: objective_clip).
ALL = sorted(p.stem for p in CONF.glob("*.yaml"))


def composed(name: str) -> DictConfig:
    return compose_cfg([f"balancer={name}"]).balancer


@pytest.mark.parametrize("name", ALL)
def test_config_validates_and_builds(name: str) -> None:
    node = composed(name)
    validate_target_node("balancer", node)
    bal = instantiate(node, _convert_="all")
    assert isinstance(bal, Balancer)
    bal.bind(("distill", "task"))
    # every constructor parameter is listed in the yaml (defaults documented in one place)
    params = [p for p in inspect.signature(type(bal).__init__).parameters if p != "self"]
    if name != "dto_exact":
        assert set(params) <= set(node.keys()) | {"_target_"}, set(params) - set(node.keys())


def test_pi_optimisers_are_the_papers_and_famos() -> None:
    """DTO-KD §4 / MoKD §4: "AdamW with a learning rate of 0.025 and a weight decay of 0.01" (the DTO option,
    which every DTO-KD/MoKD recipe uses); FAMO's code: Adam with L2 decay (Cranial-XIX/FAMO famo.py:20).
    Why the two are not interchangeable: tests/balancers/test_logit_optim_kinds.py."""
    dto, famo = composed("dto"), composed("famo")
    assert (dto.optimizer, dto.lr, dto.weight_decay) == ("adamw", 0.025, 0.01)
    assert (famo.optimizer, famo.lr, famo.weight_decay) == ("adam_l2", 0.025, 0.01)
    for method in ("dto_kd", "mokd"):
        assert compose_cfg([f"+method={method}"]).balancer == dto


def test_named_fixed_weights() -> None:
    kd, mean = composed("fixed_kd"), composed("fixed_mean")
    assert (kd.alpha_task, kd.alpha_distill) == (0.1, 0.9)  # mdistiller CFG.KD.LOSS.CE_WEIGHT / KD_WEIGHT
    assert (mean.alpha_task, mean.alpha_distill) == (0.5, 0.5)  # DeiT --distillation-alpha 0.5
    assert compose_cfg(["+method=deit_kd"]).balancer == mean


@pytest.mark.parametrize("key,value", [("mode", "fast"), ("lr", -1.0), ("eps", 0.0),
                                       ("optimizer", "rmsprop"), ("nonsense", 1)])
def test_bad_dto_values_are_rejected(key: str, value: object) -> None:
    node = OmegaConf.load(CONF / "dto.yaml")
    OmegaConf.set_struct(node, False)
    node[key] = value
    with pytest.raises(ConfigError):
        validate_target_node("balancer", node)


def test_bad_cross_batch_objective_is_rejected() -> None:
    node = OmegaConf.load(CONF / "cross_batch.yaml")
    node.objective = "parallel"
    with pytest.raises(ConfigError):
        validate_target_node("balancer", node)
