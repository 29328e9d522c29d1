"""Export round trip: the exported student, built from its own config, scores the logged top-1."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kdrun.engine import evaluate, make_loaders
from kdrun.commands.export import export_student
from tests.conftest import QUICK, compose_cfg, run


@pytest.mark.slow
def test_export_round_trip_keeps_top1(digits_teacher: str, tmp_path: Path) -> None:
    res = run(["teacher=convnet_l", f"teacher.checkpoint={digits_teacher}", "distill=[kl,smooth_l1]",
               "projector=orthogonal", *QUICK, "trainer.max_steps=6", "trainer.epochs=1"], tmp_path)
    out = export_student(tmp_path, which="last")
    sd = torch.load(out / "student.pth", weights_only=True)
    assert not any(k.startswith(("model.", "module.", "distill.")) for k in sd)  # no projector, no prefixes
    model = instantiate(OmegaConf.load(out / "student.yaml"))
    model.load_state_dict(sd)  # strict: exactly the plain model's keys
    cfg = compose_cfg(QUICK)
    data = instantiate(cfg.dataset)
    task = instantiate(cfg.task)
    from kdrun.config import TrainerConfig

    t = TrainerConfig(**OmegaConf.to_container(cfg.trainer))
    loaders = make_loaders(data, t, 0, torch.device("cpu"), aux=False, task=task)
    metrics = evaluate(model, loaders.val, task, torch.device("cpu"))
    assert metrics["top1"] == pytest.approx(res["final"]["top1"], abs=1e-9)


def test_export_of_timm_student_loads_with_timm_checkpoint_path(tmp_path: Path) -> None:
    import timm

    from kdrun.runtime import checkpoint as ckpt
    m = timm.create_model("resnet18", num_classes=7, in_chans=1)
    ckpt.save_atomic({"format": ckpt.FORMAT, "student": m.state_dict(),
                      "config": OmegaConf.to_yaml({"student": {"model": {"_target_": "timm.create_model",
                                                                         "model_name": "resnet18",
                                                                         "num_classes": 7, "in_chans": 1}}})},
                     tmp_path / "best.pt")
    out = export_student(tmp_path)
    again = timm.create_model("resnet18", num_classes=7, in_chans=1, checkpoint_path=str(out / "student.pth"))
    for k, v in m.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def _tiny_run(run_dir: Path) -> Path:
    """A run dir holding a best.pt of a 2-stage ConvNet (what export reads), no training."""
    from kdrun.runtime import checkpoint as ckpt
    from kdrun.models.convnet import ConvNet

    node = {"_target_": "kdrun.models.convnet.ConvNet", "widths": [2, 4], "num_classes": 3, "in_chans": 1}
    ckpt.save_atomic({"format": ckpt.FORMAT, "student": ConvNet(**{k: v for k, v in node.items() if k != "_target_"})
                      .state_dict(), "config": OmegaConf.to_yaml({"student": {"model": node}})}, run_dir / "best.pt")
    return run_dir


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_export_out_at_an_existing_file_is_one_paragraph(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    from kdrun.cli import main

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    run_dir = _tiny_run(tmp_path)
    blocker = tmp_path / "student.pth"
    blocker.write_bytes(b"keep me")
    out = blocker if where == "file" else blocker / "export"
    with pytest.raises(SystemExit) as e:
        main(["export", str(run_dir), "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    what = "is an existing file" if where == "file" else f"is under {blocker}, which is a file"
    assert err.startswith(f"kdrun: error: --out {out} {what}; export writes a directory")
    assert blocker.read_bytes() == b"keep me"
    main(["export", str(run_dir), "--out", str(tmp_path / "new" / "dir")])  # a directory path is created
    assert (tmp_path / "new" / "dir" / "student.pth").is_file()
