"""Issue #25 item 4: Weights & Biases and MLflow beside TensorBoard (``logger.backends``), offline.

Every value is read back from each backend's own files (W&B's offline run file, MLflow's file store through
MlflowClient, TensorBoard's events) and compared with ``metrics.jsonl``; the config, the sweep grouping and
the resume of the same tracker run are read back too; a missing extra or a tracker that cannot start is one
paragraph, exit 2, and leaves nothing."""
from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from kdrun.config import ConfigError, validate
from kdrun.runtime.log_backends.base import flatten
from kdrun.runtime.logger import RunLogger
from tests.conftest import QUICK, compose_cfg, event_scalars

wandb = pytest.importorskip("wandb")  # the [wandb] and [mlflow] extras are in [dev]
pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

QUIET_LOGS = ["hydra/job_logging=none", "hydra/hydra_logging=none"]
TRACKED = ["logger.backends=[tensorboard,wandb,mlflow]", "logger.log_every=1", "logger.grad_stats_every=2"]


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """W&B offline with its home-directory files under tmp_path (no system statistics: faster); an MLflow
    file store under tmp_path. Yields the store's URI. W&B reads its variables once per process (at the
    first wandb.init, into its process-wide session): the session is torn down after each test, so that the
    next one's variables count."""
    for var in ("WANDB_PROJECT", "WANDB_API_KEY", "WANDB_CONSOLE", "WANDB_QUIET", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB__DISABLE_STATS", "true")  # W&B's x_disable_stats: no system-metrics sampler
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.18 refuses a file store without it
    wandb.teardown()
    yield uri
    wandb.teardown()


def wandb_records(run_dir: Path) -> list[Any]:
    """The records of every offline W&B run file in ``run_dir/wandb`` (sessions in order), parsed with W&B's
    own protobuf schema. The file is a LevelDB log (32 KiB blocks of records: CRC-32, length, type, data;
    FIRST/MIDDLE/LAST pieces of a long record) after a 7-byte ":W&B" header, as wandb/wandb
    wandb/sdk/internal/datastore.py (DataStore.scan_record/scan_data, lines 110-160 at b6e2950588) reads it;
    W&B 0.31 ships no Python reader (wandb-core writes it: core/internal/transactionlog)."""
    from wandb.proto.wandb_internal_pb2 import Record

    block, header = 32768, 7
    records = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        i, pieces = header, b""
        while i + header <= len(data):
            if block - i % block < header:  # a block's tail too short for a record header is zero padding
                i += block - i % block
                continue
            crc, length, kind = struct.unpack("<IHB", data[i:i + header])
            piece = data[i + header:i + header + length]
            if kind == 0:  # zero bytes of a preallocated or unfinished block: the end
                break
            assert crc == zlib.crc32(piece, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF, path
            i += header + length
            pieces += piece
            if kind in (1, 4):  # FULL, LAST
                record = Record()
                record.ParseFromString(pieces)
                records.append(record)
                pieces = b""
    return records


def wandb_history(records: list[Any]) -> dict[tuple[int, str], float]:
    """{(step, key): value} of the history rows (W&B's own _step/_runtime/_timestamp left out)."""
    out: dict[tuple[int, str], float] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for k, v in row.items():
                if not k.startswith("_"):
                    assert (row["_step"], k) not in out, f"step {row['_step']} {k} logged twice"
                    out[(row["_step"], k)] = v
    return out


def wandb_config(records: list[Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        updates = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        config.update({u.key: json.loads(u.value_json) for u in updates})
    return config


def jsonl_values(run_dir: Path) -> dict[tuple[int, str], float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(row["step"], k): v for row in rows for k, v in row.items() if k not in ("kind", "step")}


def mlflow_values(client: MlflowClient, run_id: str) -> dict[tuple[int, str], float]:
    keys = client.get_run(run_id).data.metrics
    out = {}
    for key in keys:
        history = client.get_metric_history(run_id, key)
        assert len({m.step for m in history}) == len(history), f"{key}: a step logged twice"
        out.update({(m.step, key): m.value for m in history})
    return out


def test_a_sweep_job_logs_the_same_values_config_and_group_to_every_backend(
        tmp_path: Path, offline: str, kdrun_cli: Callable, digits_teacher: str) -> None:
    sweep = tmp_path / "sweep"
    code, _, err = kdrun_cli("train", "-m", "+recipe=quickstart", f"teacher.checkpoint={digits_teacher}",
                             "trainer.max_steps=4", *TRACKED, f"hydra.sweep.dir={sweep}", *QUIET_LOGS)
    assert code == 0, err
    (run_dir,) = [p for p in sweep.iterdir() if p.is_dir()]
    expected = jsonl_values(run_dir)
    keys = {k for _, k in expected}
    assert {"pi/distill", "pi/task", "loss/ce", "loss/kl", "grad/conflict", "grad/dominance", "val/top1",
            "teacher/val_top1", "lr"} <= keys
    ids = json.loads((run_dir / "trackers.json").read_text())

    assert {(s, k): v for k, pts in event_scalars(run_dir).items() for s, v in pts} == pytest.approx(expected)

    records = wandb_records(run_dir)
    assert wandb_history(records) == expected  # every value, exactly (W&B keeps the float64)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.run_group, run.display_name, run.project) == \
        (ids["wandb"], str(sweep), run_dir.name, "kdrun")
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())  # the run's resolved config
    assert resolved["trainer"]["max_steps"] == 4 and resolved["logger"]["group"] == str(sweep)
    assert {k: v for k, v in wandb_config(records).items() if k != "_wandb"} == resolved

    client = MlflowClient(tracking_uri=offline)
    (found,) = client.search_runs([client.get_experiment_by_name("kdrun").experiment_id])
    assert found.info.run_id == ids["mlflow"] and found.info.status == "FINISHED"
    assert found.info.run_name == run_dir.name
    assert found.data.tags["kdrun.sweep"] == str(sweep) and found.data.tags["kdrun.run_dir"] == str(run_dir)
    assert found.data.params == {k: str(v) for k, v in flatten(resolved).items()}
    assert found.data.params["distill.kl.temperature"] == "4.0"
    assert found.data.params["logger.backends"] == "['tensorboard', 'wandb', 'mlflow']"
    assert mlflow_values(client, ids["mlflow"]) == pytest.approx(expected, nan_ok=True)


def test_a_resumed_run_continues_the_same_tracker_runs(tmp_path: Path, offline: str, kdrun_cli: Callable) -> None:
    run_dir = tmp_path / "run"
    common = [*QUICK, *TRACKED, f"hydra.run.dir={run_dir}", *QUIET_LOGS]
    code, _, err = kdrun_cli("train", *common, "trainer.max_steps=2")
    assert code == 0, err
    first = json.loads((run_dir / "trackers.json").read_text())
    code, _, err = kdrun_cli("train", *common, "trainer.max_steps=4", "trainer.resume=auto")
    assert code == 0, err
    assert json.loads((run_dir / "trackers.json").read_text()) == first
    expected = jsonl_values(run_dir)
    assert {s for s, _ in expected} == {1, 2, 3, 4}

    records = wandb_records(run_dir)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert [r.run_id for r in runs] == [first["wandb"]] * 2 and runs[0].run_group == ""  # a single run: no group
    assert wandb_history(records) == expected
    assert wandb_config(records)["trainer"]["resume"] == "auto"  # the latest session's config

    client = MlflowClient(tracking_uri=offline)
    run = client.get_run(first["mlflow"])
    assert run.info.status == "FINISHED" and "kdrun.sweep" not in run.data.tags
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert mlflow_values(client, first["mlflow"]) == pytest.approx(expected, nan_ok=True)
    assert run.data.params["trainer.max_steps"] == "2"  # MLflow params cannot change: the change is a tag
    assert "trainer.max_steps=4" in run.data.tags["kdrun.changed_on_resume"]


def test_steps_a_killed_session_sent_are_not_sent_again(tmp_path: Path, offline: str) -> None:
    """Killed after step 6 with its checkpoint at step 4: metrics.jsonl and TensorBoard take the resumed
    session's steps 5 and 6; W&B and MLflow, which cannot drop values, keep the killed session's and get
    only step 7 on, so every step is there once."""
    backends = ["tensorboard", "wandb", "mlflow"]
    killed = RunLogger(tmp_path, backends, config={"trainer": {"epochs": 1}})
    for step in range(1, 7):
        killed.log(step, {"loss": float(step)})
    killed.close()
    resumed = RunLogger(tmp_path, backends, resumed_at=4, config={"trainer": {"epochs": 2}})
    for step in (5, 6, 7):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()
    ids = json.loads((tmp_path / "trackers.json").read_text())
    ours = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0), (7, 70.0)]
    theirs = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 6.0), (7, 70.0)]
    assert sorted((s, v) for (s, _), v in jsonl_values(tmp_path).items()) == ours
    assert event_scalars(tmp_path)["loss"] == ours
    assert sorted((s, v) for (s, _), v in wandb_history(wandb_records(tmp_path)).items()) == theirs
    history = MlflowClient(tracking_uri=offline).get_metric_history(ids["mlflow"], "loss")
    assert sorted((m.step, m.value) for m in history) == theirs


@pytest.mark.parametrize("missing,extra", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_missing_extra_is_one_paragraph_and_writes_nothing(tmp_path: Path, kdrun_cli: Callable,
                                                             monkeypatch: pytest.MonkeyPatch, missing: str,
                                                             extra: str) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # `import wandb` fails and find_spec finds nothing
    run_dir = tmp_path / "runs" / "new"
    code, out, err = kdrun_cli("train", *QUICK, f"logger.backends=[tensorboard,{missing}]",
                               f"hydra.run.dir={run_dir}", *QUIET_LOGS)
    assert code == 2 and f'pip install -e ".[{extra}]"' in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # the directories this command made are gone


def test_a_tracker_that_cannot_start_is_one_paragraph_and_leaves_no_files(
        tmp_path: Path, offline: str, kdrun_cli: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B online without a login: its error, the ways on, exit 2; the run's files were not written."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc login
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    run_dir = tmp_path / "run"
    code, _, err = kdrun_cli("train", *QUICK, "trainer.max_steps=1", "logger.backends=[tensorboard,wandb]",
                             f"hydra.run.dir={run_dir}", *QUIET_LOGS)
    assert code == 2 and "W&B could not start a run" in err and "WANDB_MODE=offline" in err, err
    assert "Traceback" not in err
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_an_mlflow_store_the_client_cannot_open_is_refused_first(tmp_path: Path, kdrun_cli: Callable,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    if getattr(mlflow.environment_variables, "MLFLOW_ALLOW_FILE_STORE", None) is None:
        pytest.skip(f"MLflow {mlflow.__version__} opens a file store without MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    code, _, err = kdrun_cli("train", *QUICK, "logger.backends=[mlflow]", f"hydra.run.dir={tmp_path / 'run'}",
                             *QUIET_LOGS)
    assert code == 2 and "MLFLOW_ALLOW_FILE_STORE=true" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlruns").exists()


def test_backend_names_are_checked_and_old_configs_read() -> None:
    for value, words in (("[tensorboard,wandbb]", "did you mean wandb?"), ("wandb", "must be a list")):
        with pytest.raises(ConfigError, match="logger.backends") as e:
            validate(compose_cfg([*QUICK, f"logger.backends={value}"]))
        assert words in str(e.value) and 'pip install -e ".[mlflow]"' in str(e.value)
    from omegaconf import open_dict

    saved = compose_cfg(QUICK)  # a checkpoint's config from before logger.backends (kdrun eval validates it)
    with open_dict(saved.logger):
        del saved.logger["backends"]
        saved.logger.tensorboard = False
    assert validate(saved).logger.backends == []


def test_a_backend_that_fails_mid_run_is_dropped_with_one_warning(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    class Gone:
        name, rewinds, run_id = "mlflow", False, None

        def log_params(self, config: Any) -> None:
            pass

        def log_scalars(self, step: int, values: Any) -> None:
            raise ConnectionError("tracking server unreachable")

        def close(self) -> None:
            pass

    monkeypatch.setattr("kdrun.runtime.logger.open_backends", lambda *a: [Gone()])
    logger = RunLogger(tmp_path, ["mlflow"])
    logger.log(1, {"loss": 1.0})
    logger.log(2, {"loss": 2.0})
    logger.close()
    err = capsys.readouterr().err
    assert err.count("logging to mlflow failed at step 1 (tracking server unreachable)") == 1
    assert [s for s, _ in jsonl_values(tmp_path)] == [1, 2]
