"""The loop of a group (:mod:`kdrun.engine.group`): its members, their consoles and failures, the shared
auxiliary batches, and :class:`GroupLoop`, which drives every member's :class:`~kdrun.engine.loop.Loop` over
one loader.

Every member's work (its step, validation, saves) runs through :meth:`Group.each`: on its own model stream,
with the console routed to its ``cli.log``, and guarded, so that an exception drops that member alone (with
its error in its own directory) and the others go on. Under DDP the ranks agree after each such pass on
which members failed (one 8-byte all-reduce, plus a gather of the messages when one did).
"""
from __future__ import annotations

import contextlib
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig

from kdrun.config import RunSettings, TrainerConfig
from kdrun.data.loaders import AuxStream, Loaders
from kdrun.engine.build import Parts, StudentStart, TeacherSide
from kdrun.engine.loop import Loop, prepared_batches
from kdrun.engine.step import Prepared
from kdrun.engine.streams import OwnStream, aux_stream
from kdrun.errors import find_user_error, full_traceback_requested
from kdrun.runtime import distributed
from kdrun.runtime import preemption
from kdrun.runtime.checkpoint import Checkpointer, TrainState
# The same line sinks and tee as a run's own ConsoleLog: a group routes them per member.
from kdrun.runtime.console_log import ConsoleLog, _LineSink, _Tee
from kdrun.runtime.rundir import RunLock


@dataclass
class Member:
    """One job of a group and what it is made of as its build goes on; ``result`` set: it is done
    (finished, stopped, refused or failed) and takes no further part."""

    index: int
    cfg: DictConfig
    run_dir: Path
    record: dict[str, str]
    settings: RunSettings | None = None
    lock: RunLock | None = None
    side: TeacherSide | None = None  # the shared data and teacher, with this member's task and terms
    start: StudentStart | None = None
    stream: OwnStream | None = None  # its model stream
    parts: Parts | None = None
    ckpt: Checkpointer | None = None
    restored: TrainState | None = None
    state: TrainState | None = None
    loop: Loop | None = None
    result: dict[str, Any] | None = None

    @property
    def alive(self) -> bool:
        return self.result is None

    def refuse(self, message: str, console: "GroupConsole | None" = None, user_error: bool = True) -> None:
        """This job ends with ``message`` (one paragraph), said on the console and in its own ``cli.log``.
        ``user_error``: the user can fix it (exit 2, as a single run's refusal); False, a failure inside kdrun
        or a component (the launcher fails that job as Hydra fails one that raised: exit 1)."""
        with console.on(self) if console is not None else contextlib.nullcontext():
            print(f"kdrun: error: {message}", file=sys.stderr, flush=True)
        self.result = {"run_dir": str(self.run_dir), "error": message, "user_error": user_error}
        if self.loop is not None:
            self.loop.progress.close()
            self.loop.logger.close()
        self.side = self.start = self.parts = self.ckpt = self.loop = None  # its memory goes


class GroupConsole:
    """``sys.stdout``/``sys.stderr`` of a group on the main rank: what is printed while a member is current
    (:meth:`on`: its step, validation, saves, errors) goes to that member's ``cli.log``, anything else to
    every live member's; the console shows it all. Each log holds its text until its run starts, as a
    run's own :class:`ConsoleLog`."""

    def __init__(self, members: list[Member], enabled: bool) -> None:
        self.members, self.enabled = members, enabled
        self.logs = {m.index: ConsoleLog(m.run_dir, enabled=enabled) for m in members}
        self.sinks = {i: (_LineSink(log), _LineSink(log)) for i, log in self.logs.items()}
        self.current: Member | None = None
        self.saved: tuple[Any, Any] | None = None

    def __enter__(self) -> "GroupConsole":
        if self.enabled:
            self.saved = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = _Tee(self.saved[0], _Route(self, 0)), _Tee(self.saved[1], _Route(self, 1))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.saved is None:
            return
        sys.stdout, sys.stderr = self.saved
        self.saved = None
        with contextlib.suppress(OSError, ValueError):
            for out, err in self.sinks.values():
                out.close()
                err.close()
            for log in self.logs.values():
                if log.file is not None:
                    log.file.close()

    def feed(self, which: int, text: str) -> None:
        targets = [self.current] if self.current is not None else [m for m in self.members if m.alive]
        for m in targets:
            self.sinks[m.index][which].feed(text)

    @contextlib.contextmanager
    def on(self, member: Member) -> Iterator[None]:
        before, self.current = self.current, member
        try:
            yield
        finally:
            self.current = before


class _Route:
    """The sink of one of the group console's two streams (0: stdout, 1: stderr)."""

    def __init__(self, console: GroupConsole, which: int) -> None:
        self.console, self.which = console, which

    def feed(self, text: str) -> None:
        self.console.feed(self.which, text)


class Group:
    """The members of a group, and how each one's work is run (:meth:`each`) and its failure contained."""

    def __init__(self, members: list[Member], console: GroupConsole) -> None:
        self.members, self.console = members, console
        self.agreed: set[int] = set()  # members whose end every rank knows

    def alive(self) -> list[Member]:
        return [m for m in self.members if m.alive]

    @contextlib.contextmanager
    def guard(self, member: Member) -> Iterator[None]:
        """An exception inside ends ``member`` alone: its error (a user error's paragraph; otherwise the
        traceback too) on the console and in its ``cli.log``."""
        try:
            yield
        except SharedBatchWritten:
            raise  # the other students' batch is no longer the one they would see alone
        except Exception as e:  # noqa: BLE001 — one student's failure must not end the others
            user = find_user_error(e)
            if user is None or full_traceback_requested():
                with self.console.on(member):
                    traceback.print_exception(e)
            member.refuse(str(user) if user is not None else
                          f"{type(e).__name__}: {e} (a failure inside kdrun or a component; its traceback is above "
                          f"and in {member.run_dir / 'cli.log'}).", self.console, user_error=user is not None)

    def each(self, work: Callable[[Member], Any]) -> None:
        """``work(member)`` for every live member in turn, on its own model stream and console, guarded;
        then the ranks agree on the failures."""
        for m in self.alive():
            with self.guard(m):
                assert m.stream is not None
                with m.stream.active(), self.console.on(m):
                    work(m)
        self.agree()

    def agree(self) -> None:
        """Under DDP: a member that failed on any rank ends on every rank (collective)."""
        if not distributed.is_dist():
            return
        mine = {m.index: (m.result["error"], m.result["user_error"]) for m in self.members
                if m.result is not None and "error" in m.result and m.index not in self.agreed}
        if not distributed.all_reduce_max_int(int(bool(mine))):
            return
        for rank, theirs in enumerate(distributed.all_gather_object(mine)):
            for i, (message, user_error) in theirs.items():
                self.agreed.add(i)
                if self.members[i].alive:
                    self.members[i].refuse(f"(rank {rank}) {message}", self.console, user_error)


class SharedBatchWritten(RuntimeError):
    """A student's step wrote into the prepared batch that the group's students share (a loss term or model
    that modifies its inputs or the teacher's outputs in place): the students after it would not see the
    batch they see alone, so the group stops."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(f"the step of the job in {run_dir} modified the shared batch (its inputs, targets or the "
                         "teacher's outputs) in place, so the group's other students cannot share it; train these "
                         "jobs without hydra/launcher=kdrun_shared, or make the component copy before writing.")


def tensor_versions(batch: Prepared) -> list[int]:
    """The version counters of a prepared batch's tensors (an in-place write increments its tensor's)."""
    tensors = [batch.x, batch.y, batch.index]
    if batch.teacher is not None:
        tensors += [batch.teacher.logits, *batch.teacher.features.values()]
    return [t._version for t in tensors if isinstance(t, torch.Tensor)]


class SharedAux:
    """The auxiliary batches of a group's extra-batch students (cross-batch): the ``n``-th one is drawn
    once, on the auxiliary stream of ``n`` (what a run alone draws it on: :func:`kdrun.engine.streams.aux_draws`),
    and handed to every student that asks for its ``n``-th."""

    def __init__(self, loaders: Loaders, batch_size: int, seed: int) -> None:
        self.loaders, self.batch_size, self.seed = loaders, batch_size, seed
        self.position = TrainState()  # where the shared stream stands (its aux_batches)
        self.stream: AuxStream | None = None
        self.drawn: tuple[int, Any] = (-1, None)

    def draws(self, state: TrainState) -> Callable[[], Any]:
        """The draws of the student whose counters are ``state`` (its ``aux_batches``, checkpointed)."""
        def draw() -> Any:
            n = state.aux_batches
            if self.drawn[0] != n:
                if self.stream is None or self.position.aux_batches != n:  # (re)positioned at batch n
                    self.position = TrainState(aux_batches=n)
                    self.stream = AuxStream(self.loaders, self.batch_size, self.seed, self.position)
                with aux_stream(self.seed, n):
                    self.drawn = (n, self.stream())
            state.aux_batches += 1
            return self.drawn[1]
        return draw


class GroupLoop:
    """The members' loops in lockstep over one loader: each step's batch is fetched and prepared (mixup,
    teacher forward) once, on the data stream, then every member takes its step
    (:meth:`~kdrun.engine.step.KDStep.learn`) and its own bookkeeping (:meth:`Loop.record`, ``save_if_due``,
    ``end_epoch``). One stop rule and one :class:`~kdrun.runtime.preemption.Preemption` for all: every member
    stops after the same step. ``run`` returns that preemption state."""

    def __init__(self, group: Group, loaders: Loaders, seed: int, trainer: TrainerConfig) -> None:
        self.group, self.loaders, self.seed, self.trainer = group, loaders, seed, trainer
        self.preempt = preemption.Preemption(trainer.preempt_signals, trainer.preempt_check_every)
        loops = [m.loop for m in group.alive() if m.loop is not None]
        self.prepare = loops[0].step.prepare  # the data side is the same in every member's step
        for loop in loops:
            loop.preempt = self.preempt

    def lead(self) -> Loop:
        loop = self.group.alive()[0].loop
        assert loop is not None
        return loop

    def run(self) -> preemption.Preemption:
        group, many = self.group, len(self.group.members) > 1
        group.each(lambda m: m.loop.begin(label=m.run_dir.name if many else None))
        stop = False
        with self.preempt:  # handlers restored on exit, also when a step raises
            while group.alive() and self.lead().state.epoch < self.trainer.epochs and not stop:
                stop = self.train_epoch()
                if self.preempt.agreed:
                    break  # saved as is, as Loop.run does
                group.each(lambda m: m.loop.end_epoch(stop))
        group.each(lambda m: m.loop.end())
        return self.preempt

    def train_epoch(self) -> bool:
        """The rest of the current epoch; True when a stop rule ended it early (or no member is left)."""
        group, state = self.group, self.lead().state
        self.loaders.start_epoch(state.epoch, state.epoch_step, self.seed)
        for batch in prepared_batches(self.loaders.train, self.prepare, self.seed, lambda: self.lead().state.step):
            step, versions = self.lead().state.step, tensor_versions(batch)

            def learn(m: Member) -> None:
                m.loop.record(m.loop.step.learn(batch, step))
                if tensor_versions(batch) != versions:
                    raise SharedBatchWritten(m.run_dir)

            group.each(learn)
            if not group.alive():
                return True
            if self.lead().stop_rule(self.preempt):
                return True
            group.each(lambda m: m.loop.save_if_due())
        group.each(lambda m: m.loop.next_epoch())
        return False
