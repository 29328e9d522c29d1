"""Balancer sweeps from the shell: readable job directories (conf/config.yaml ``hydra.sweep.subdir``).

`kdrun train -m +recipe=R balancer=a,b seed=0,1` must give one directory per job named by balancer and
seed (``0_a_seed0``...), unique even when other keys are swept, and free of the override string (commas,
'=' and paths in it broke later ``trainer.resume=DIR/...`` overrides). Checked two ways: the real config's
interpolation resolved through Hydra's compose API, and a real Hydra multirun of a tiny app that uses
the same ``hydra.sweep`` node (seconds, no training). That every recipe x balancer composes and validates
is tests/recipes/test_recipes.py.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from kdrun.cli import config_dir

CONF = config_dir()


def subdir_of(overrides: list[str], num: int) -> str:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.job.num = num  # set by the launcher per job
    return str(OmegaConf.select(cfg, "hydra.sweep.subdir"))


def test_sweep_subdir_names_balancer_and_seed() -> None:
    assert subdir_of(["+recipe=cifar100_resnet56_resnet20_kd", "balancer=dto", "seed=3"], 7) == "7_dto_seed3"
    # The recipe's own balancer when none is chosen on the command line.
    assert subdir_of(["+recipe=cifar100_resnet56_resnet20_kd", "seed=0"], 0) == "0_fixed_kd_seed0"
    assert subdir_of(["+recipe=quickstart", "balancer.alpha_distill=0.1", "trainer.resume=auto"], 2) == \
        "2_fixed_mean_seed0"


APP = '''
import sys
from pathlib import Path
import hydra
from hydra.core.hydra_config import HydraConfig

@hydra.main(config_path=sys.argv.pop(1), config_name="config", version_base="1.3")
def main(cfg):
    Path(HydraConfig.get().runtime.output_dir, "job.txt").write_text(f"{cfg.balancer.name} {cfg.seed} {cfg.lr}")

main()
'''


def test_multirun_job_directories_are_readable_and_unique(tmp_path: Path) -> None:
    """A real multirun (Hydra's basic launcher) with kdrun's hydra.sweep/hydra.job settings."""
    conf = tmp_path / "conf"
    (conf / "balancer").mkdir(parents=True)
    for b in ("fixed", "dto"):
        (conf / "balancer" / f"{b}.yaml").write_text(f"name: {b}\n")
    real = yaml.safe_load((CONF / "config.yaml").read_text())["hydra"]
    tiny = {"defaults": [{"balancer": "fixed"}, "_self_"], "seed": 0, "lr": 0.1,
            "hydra": {"sweep": real["sweep"], "job": real["job"]}}
    (conf / "config.yaml").write_text(yaml.safe_dump(tiny))
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    out = tmp_path / "multirun"
    res = subprocess.run([sys.executable, str(tmp_path / "app.py"), str(conf), "-m", "balancer=fixed,dto",
                          "seed=0,1", "lr=0.1,0.2", f"hydra.sweep.dir={out}"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    jobs = {d.name: (d / "job.txt").read_text() for d in out.iterdir() if d.is_dir()}
    want = {}
    for i, (b, s, lr) in enumerate((b, s, lr) for b in ("fixed", "dto") for s in (0, 1) for lr in (0.1, 0.2)):
        want[f"{i}_{b}_seed{s}"] = f"{b} {s} {lr}"  # lr swept too: the job number keeps names unique
    assert jobs == want
