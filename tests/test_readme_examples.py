"""Every `kdrun train` line of the README composes and validates as written (issue #21: "the README's
examples each run as written or say why not"). A sweep (`-m`) is split into its jobs by Hydra's own
sweeper. Placeholders a reader fills in (NAME, RECIPE, /path/...) get one concrete value; lines that
need a cluster are run by tests/slurm (which reads the README too), and the quickstart itself runs in
tests/test_engine.py. Training on real data sets (CIFAR-100, ImageNet, COCO) needs their files: the
README says so beside those lines, and here they are composed and validated only."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from kdrun.config import validate
from tests.conftest import compose_cfg
from tests.recipes.test_group_switches import sweep_jobs

README = Path(__file__).resolve().parents[1] / "README.md"
# What a reader substitutes, and what this test substitutes for it.
PLACEHOLDERS = {"+recipe=NAME": "+recipe=quickstart", "+recipe=RECIPE": "+recipe=quickstart",
                "teacher.checkpoint=/path/to/resnet56.pth": "teacher.checkpoint=/nonexistent/resnet56.pth"}
# Lines whose command is not a training config (or runs elsewhere): why, per line prefix.
ELSEWHERE = {"--help": "prints the groups (tests/test_config.py)",
             "hydra/launcher=slurm": "submits to Slurm (tests/slurm/test_cluster.py)"}


def train_lines() -> list[str]:
    """The `kdrun train ...` commands of the README's bash blocks, continuation lines joined, comments
    dropped."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line.startswith("kdrun train"):
                lines.append(line.split(" #", 1)[0].strip())
    return lines


def overrides(line: str) -> list[str]:
    argv = shlex.split(line)[2:]
    return [PLACEHOLDERS.get(a, a) for a in argv]


def test_the_readme_has_train_examples() -> None:
    assert len(train_lines()) >= 10  # the parser finds them (a README reshuffle must not silence this test)


@pytest.mark.parametrize("line", train_lines())
def test_every_readme_train_line_composes_and_validates(line: str) -> None:
    reason = next((why for key, why in ELSEWHERE.items() if key in line), None)
    if reason:
        pytest.skip(reason)
    argv = overrides(line)
    multirun = "-m" in argv
    argv = [a for a in argv if a != "-m"]
    assert not any(re.search(r"\b[A-Z]{3,}\b", a) for a in argv), f"an unfilled placeholder in {line}"
    jobs = sweep_jobs(argv) if multirun else [argv]
    assert jobs
    for job in jobs:
        validate(compose_cfg(job))
