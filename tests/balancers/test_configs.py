"""Every balancer config validates against its constructor's signature and builds a Balancer."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kdrun.balancers.base import Balancer
from kdrun.config import ConfigError, validate_target_node

CONF = Path(__file__).resolve().parents[2] / "conf" / "balancer"
MINE = ["dto", "dto_exact", "famo", "cross_batch", "mgda", "pcgrad", "cagrad", "fairgrad", "imtl",
        "nash_mtl", "upgrad", "uncertainty", "gradnorm", "dwa", "distill_decay"]


@pytest.mark.parametrize("name", MINE)
def test_config_validates_and_builds(name: str) -> None:
    node = OmegaConf.load(CONF / f"{name}.yaml")
    validate_target_node("balancer", node)
    bal = instantiate(node, _convert_="all")
    assert isinstance(bal, Balancer)
    bal.bind(("distill", "task"))
    # every constructor parameter is listed in the yaml (defaults documented in one place)
    params = [p for p in inspect.signature(type(bal).__init__).parameters if p != "self"]
    if name != "dto_exact":
        assert set(params) <= set(node.keys()) | {"_target_"}, set(params) - set(node.keys())


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
