"""The training loop: epochs, the stop rules (``max_steps``, agreed stop signals), validation at epoch
ends, ``best.pt``/``last.pt`` and the periodic mid-epoch saves. One optimiser step is
:class:`~kdrun.engine.step.KDStep`; this module only decides when steps, evaluations and saves happen."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from kdrun.runtime import distributed
from kdrun.runtime import preemption
from kdrun.runtime.checkpoint import Checkpointer, TrainState
from kdrun.engine.build import Parts
from kdrun.engine.ema import ema_metrics
from kdrun.engine.step import KDStep, Prepared, StepOutcome
from kdrun.engine.streams import data_stream
from kdrun.engine.validation import evaluate
from kdrun.runtime.logger import Progress, RunLogger, current_phase, format_metrics, format_value


class Loop:
    """Runs ``step`` until ``trainer.epochs``/``max_steps`` or an agreed stop signal.

    After :meth:`run`: ``last_val`` holds the validation metrics of the final weights (those in
    ``last.pt``), ``ema_val`` those of their EMA (``trainer.ema``; empty without), ``images``/``wall`` the
    throughput figures, and ``preempt`` the stop-signal state
    (``preempt.agreed``: stopped early).

    Console (rank 0, ``logger.progress``): the teacher's val line once, the bar (its text: the epoch and
    every objective's value on the last log step), one line per validation, and, inside a
    :func:`kdrun.runtime.logger.console_phase` (the teacher fit), the phase's name on all of them and a line
    when it ends. The bar shows the objectives, not the balanced sum: they mean the same under every
    balancer, while Σ wᵢLᵢ depends on each balancer's weight convention (exact DTO's raw weights πᵢ/Lᵢ
    make it Σ πᵢ = 1 on every step)."""

    def __init__(self, parts: Parts, step: KDStep, state: TrainState, checkpointer: Checkpointer,
                 logger: RunLogger, run_dir: Path, progress: bool) -> None:
        self.parts, self.step, self.state, self.ckpt, self.logger = parts, step, state, checkpointer, logger
        self.run_dir, self.show_progress = run_dir, progress
        self.last_val: dict[str, float] = {}
        self.ema_val: dict[str, float] = {}
        self.images = 0
        self.wall = 0.0
        self.window_t, self.window_images = 0.0, 0  # images/s between consecutive log steps
        self.preempt = preemption.Preemption(parts.trainer.preempt_signals, parts.trainer.preempt_check_every)
        self.phase = current_phase()  # "teacher fit" while the teacher is fitted, else None
        self.progress = Progress(parts.total_steps, enabled=False)  # replaced in begin()
        self.t_start = time.perf_counter()

    def save(self, name: str) -> None:
        self.state.skipped = self.step.skipped
        self.ckpt.save(name, self.state, self.last_val)

    def validate(self, model: Any, results_name: str, precision: str | None = None) -> dict[str, float]:
        """Val metrics of ``model`` (the student, or the teacher in its own precision)."""
        parts = self.parts
        return evaluate(model, parts.loaders.val, parts.task, parts.device, precision or parts.trainer.precision, parts.trainer.channels_last,
                        results_path=self.run_dir / results_name)

    def validate_students(self) -> None:
        """``last_val`` (the student) and ``ema_val`` (its EMA, evaluated alike, when ``trainer.ema``)."""
        self.last_val = self.validate(self.parts.student, "val_detections.json")
        ema = self.parts.ema
        self.ema_val = self.validate(ema.module, "ema_val_detections.json") if ema is not None else {}

    def run(self) -> None:
        trainer, state = self.parts.trainer, self.state
        self.begin()
        stop = False
        # Stop signals are only recorded; the loop acts on them at a step boundary all ranks agree on.
        with self.preempt:  # handlers restored on exit, also when a step raises
            while state.epoch < trainer.epochs and not stop:
                stop = self.train_epoch()
                if self.preempt.agreed:
                    # Saved as is, even when the epoch's last step was just taken (epoch_step == steps
                    # per epoch): the resumed run then runs the epoch's end (validation, best.pt)
                    # itself, so a stop costs no time for evaluation inside the grace period.
                    break
                self.end_epoch(stop)
        self.end()

    def begin(self, label: str | None = None) -> None:
        """The session starts: train mode, the progress bar (``label``: its prefix, default the phase),
        the teacher's val line, the clocks."""
        self.parts.trainable.train()
        self.progress = Progress(self.parts.total_steps, enabled=distributed.is_main() and self.show_progress,
                                 label=label if label is not None else self.phase)
        if self.state.teacher_metrics:  # measured once per run (kept in the checkpoints), shown once per session
            self.progress.write(f"teacher  val {format_metrics(self.state.teacher_metrics, self.parts.task.metric_keys)}")
        self.t_start = self.window_t = time.perf_counter()

    def end(self) -> None:
        """The session ends (the loop is done or stopped): the bar, the final val of a resumed finished
        run, the clocks."""
        state, progress = self.state, self.progress
        progress.finish(state.step)  # the last step is not always a log step: the bar ends where the run did
        if not self.preempt.agreed and not self.last_val:  # resumed a finished run
            self.validate_students()
        if self.phase and not self.preempt.agreed:
            progress.write(f"{self.phase}: done after {state.epoch} epochs ({state.step} steps); val "
                           f"{format_metrics(self.last_val, self.parts.task.metric_keys)}")
        progress.close()
        self.wall = time.perf_counter() - self.t_start
        state.skipped = self.step.skipped

    def train_epoch(self) -> bool:
        """The rest of the current epoch; True when a stop rule ended it early."""
        state, parts = self.state, self.parts
        parts.loaders.start_epoch(state.epoch, state.epoch_step, parts.seed)
        for batch in prepared_batches(parts.loaders.train, self.step.prepare, parts.seed, lambda: state.step):
            self.record(self.step.learn(batch, state.step))
            if self.stop_rule(self.preempt):
                return True
            self.save_if_due()
        self.next_epoch()
        return False

    def record(self, out: StepOutcome) -> None:
        """The bookkeeping of a step taken: the counters, the throughput, the log and the bar."""
        state = self.state
        state.step += 1
        state.epoch_step += 1
        n_images = out.images * distributed.world_size()
        self.images += n_images
        self.window_images += n_images
        if out.values:
            now = time.perf_counter()
            out.values["train/images_per_s"] = torch.tensor(self.window_images / max(1e-9, now - self.window_t))
            self.window_t, self.window_images = now, 0
            vals = self.logger.log(state.step, out.values)
            if vals:
                self.progress.update(state.step, f"ep {state.epoch + 1}/{self.parts.trainer.epochs} " + objectives_text(vals))

    def stop_rule(self, preempt: preemption.Preemption) -> bool:
        """Whether the loop stops after the step just taken: ``max_steps``, or a stop signal that every rank
        agrees on (collective: every rank asks after every step)."""
        return 0 < self.parts.trainer.max_steps <= self.state.step or preempt.should_stop(self.state.step)

    def save_if_due(self) -> None:
        """``last.pt`` every ``save_every_steps`` mid-epoch: survives a kill -9 (epoch ends save in end_epoch)."""
        every, state = self.parts.trainer.save_every_steps, self.state
        if 0 < every and state.step % every == 0 and state.epoch_step < self.parts.steps_per_epoch:
            self.save("last.pt")

    def next_epoch(self) -> None:
        self.state.epoch += 1
        self.state.epoch_step = 0

    def end_epoch(self, stop: bool) -> None:
        """Validation (every ``val_every`` epochs, the last one, and a stop at an epoch end), best.pt and
        last.pt."""
        trainer, state, task = self.parts.trainer, self.state, self.parts.task
        if stop and state.epoch_step == self.parts.steps_per_epoch:  # max_steps landed on an epoch end
            self.next_epoch()
        ended_epoch = state.epoch_step == 0
        # A stop mid-epoch (max_steps) is validated too: the final figures are then those of the weights
        # last.pt holds, which is what `kdrun eval RUN_DIR/last.pt` reports.
        if stop or (ended_epoch and (state.epoch % trainer.val_every == 0 or state.epoch == trainer.epochs)):
            self.validate_students()
            # The EMA's metrics beside the raw ones (ema_<k>); best.pt stays the raw student's best.
            ema = ema_metrics(self.ema_val, task.metric_keys) if self.ema_val else {}
            state.history.append({"epoch": state.epoch, "step": state.step, **self.last_val, **ema})
            self.logger.log(state.step, {**{f"val/{k}": self.last_val[k] for k in task.metric_keys},
                                         **{f"val/{k}": v for k, v in ema.items()}, "epoch": state.epoch}, kind="val")
            improved = self.last_val[task.primary_metric] > state.best_metric
            state.best_metric = max(state.best_metric, self.last_val[task.primary_metric])
            if trainer.save_best and improved:
                self.save("best.pt")
            self.progress.finish(state.step)  # the bar at this step, then the line under it
            where = f"epoch {state.epoch}/{trainer.epochs}" if ended_epoch else \
                f"step {state.step} (epoch {state.epoch + 1}/{trainer.epochs}, stopped by max_steps)"
            self.progress.write(f"{self.phase + '  ' if self.phase else ''}{where}  val "
                                f"{format_metrics(self.last_val, task.metric_keys)}  "
                                + (f"ema {format_metrics(self.ema_val, task.metric_keys)}  " if self.ema_val else "")
                                + f"(best {task.primary_metric} {format_value(state.best_metric)})")
        if trainer.save_last and (ended_epoch or stop):
            self.save("last.pt")

    def stopped(self) -> dict[str, Any]:
        """The orderly end after a stop signal: :meth:`save_stopped`, then the handler that was there
        before ours."""
        out = self.save_stopped()
        self.preempt.chain()  # e.g. submitit's requeue; returns unless that handler exits the process
        return out

    def save_stopped(self) -> dict[str, Any]:
        """``last.pt`` at the last completed step, a marker for the launcher, every rank past the save."""
        state, pre, run_dir = self.state, self.preempt, self.run_dir
        self.save("last.pt")
        if distributed.is_main():
            preemption.write_marker(run_dir, {"signal": pre.signal_name, "step": state.step, "epoch": state.epoch,
                                     "epoch_step": state.epoch_step, "time": time.time()})
            # Worded and numbered as the resume line (kdrun.runtime.checkpoint: "resumed from ... at epoch E, step S
            # (step k of the epoch)", E = TrainState.epoch), so the two lines of one stop/resume agree.
            print(f"[kdrun] {pre.signal_name}: stopped at epoch {state.epoch}, step {state.step}"
                  + (f" (step {state.epoch_step} of the epoch)" if state.epoch_step else "")
                  + f"; saved {run_dir / 'last.pt'}. Continue with trainer.resume=auto.", flush=True)
        self.logger.close()
        distributed.barrier()
        return {"run_dir": str(run_dir), "preempted": pre.signal_name, "exit_code": pre.exit_code,
                "steps": state.step, "epochs": state.epoch, "epoch_step": state.epoch_step,
                "world_size": distributed.world_size(), "checkpoint": str(run_dir / "last.pt")}


def prepared_batches(loader: Iterable[Any], prepare: Callable[[Any], Prepared], seed: int,
                     next_step: Callable[[], int]) -> Iterator[Prepared]:
    """The loader's batches, each fetched and prepared (:meth:`KDStep.prepare`: mixup, teacher) on the
    data stream of the step it is for (``next_step()``, read when the batch is fetched), so the batches do
    not depend on the random numbers the student side draws (:mod:`kdrun.engine.streams`)."""
    batches = iter(loader)
    while True:
        with data_stream(seed, next_step()):
            batch = next(batches, None)
            if batch is None:
                return
            prepared = prepare(batch)
        yield prepared


def objectives_text(vals: dict[str, float]) -> str:
    """``distill 0.4123 task 1.203``: every objective's value on this log step (see :class:`Loop`)."""
    return " ".join(f"{k[len('objective/'):]} {v:.4g}" for k, v in vals.items() if k.startswith("objective/"))
