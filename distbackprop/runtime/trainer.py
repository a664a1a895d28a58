"""`Trainer(config).fit() -> Result`: the public entry point, for every execution mode.

`prepare()` validates the configuration and the data before anything starts
and returns one frozen `PreparedRun`. `fit()` builds the worker group the
configuration asks for (in-process, or Ray actors; `mpi_launch` injects the
ranks of an ``mpiexec`` launch), hands it to the `Coordinator`, reports through
one `RunObserver` (metrics, history, checkpoints, progress) and writes the run
directory (`RunDir`). A stop signal ends the run at a chunk boundary with
everything saved and ``status: interrupted``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import TrainConfig
from ..errors import ConfigError
from .coordinator import Commit, Coordinator, State, TrainingFailed, summarize_losses
from .elastic import ElasticSize, FixedSize
from .group import GroupSpec, LocalGroup, RayGroup, WorkerGroup
from .models import data_problems, time_buckets
from .placement import make_placement
from .rundir import Checkpoint, RunDir
from .signals import StopRequest
from .worker import ReplicaSpec

# Config fields that define the model and the data order: a resumed run must not change them.
_RESUME_FIXED = ("hidden", "activation", "init", "dtype", "seed", "batch_size", "loss",
                 "optimizer", "data", "target", "features", "task", "standardize",
                 "val_fraction", "val_data", "model", "bptt_truncate", "sequence_target")

GroupFactory = Callable[[GroupSpec, int], WorkerGroup]


@dataclass
class Result:
    """What `fit` returns: `summary` (as summary.json), `history` (pyarrow.Table), `model`.

    `status` is "finished" or "interrupted" (a stop signal; `exit_status` 130 or 143).
    """

    summary: dict[str, Any]
    history: Any
    model: Any
    run_dir: Path
    worker_pids: tuple[int, ...] = ()
    exit_status: int = 0

    @property
    def status(self) -> str:
        return self.summary.get("status", "finished")


def default_loss(task: str) -> str:
    return "cross_entropy" if task == "classification" else "mse"


def output_size(loss: str, task: str, n_outputs: int) -> int:
    """Network outputs for `loss`: one logit for binary classification with bce."""
    return 1 if loss == "bce" and task == "classification" else n_outputs


@dataclass(frozen=True)
class PreparedRun:
    """Everything validated before the run starts: nothing here has touched the run directory."""

    config: TrainConfig
    bundle: Any  # data.DataBundle
    spec: ReplicaSpec
    steps_per_epoch: int
    run_dir: RunDir
    resume: Checkpoint | None

    @property
    def total_steps(self) -> int:
        return self.spec.total_steps


class Trainer:
    """Train per `config`. ``fit()`` raises `ConfigError` (bad input) or `TrainingFailed`.

    `group_factory(spec, size)` builds the worker group; by default `LocalGroup`
    for ``--local`` and `RayGroup` otherwise (Ray is then started or joined here).
    With ``launcher="mpi"`` (and no `group_factory`), ``fit()`` runs the MPI launcher
    instead, as ``train --launcher mpi`` does: call it on every rank of ``mpiexec``; rank
    0 returns the `Result`, the other ranks None.
    """

    def __init__(self, config: TrainConfig, *, started: float | None = None,
                 group_factory: GroupFactory | None = None):
        self.config = config
        self.started = started if started is not None else time.time()
        self.group_factory = group_factory

    # ------------------------------------------------------------------ preparation
    def prepare(self) -> PreparedRun:
        from ..data import load_training_data

        cfg = self.config.validate()
        run_dir, resume = _resume_point(cfg)
        if resume is not None:
            cfg = _resumed_config(cfg, run_dir)
        bundle = load_training_data(cfg)
        loss = cfg.loss or default_loss(bundle.task)
        problems = []
        if loss == "cross_entropy" and bundle.task != "classification":
            problems.append("loss: cross_entropy needs a classification target "
                            f"(the target is {bundle.task})")
        if loss == "mse" and bundle.task == "classification":
            problems.append("loss: mse needs a regression target; use --task regression "
                            "or --loss cross_entropy")
        if loss == "bce" and bundle.task == "classification" and bundle.n_outputs != 2:
            problems.append(f"loss: bce needs 2 classes, the target has {bundle.n_outputs}")
        if cfg.label_smoothing and loss != "cross_entropy":
            problems.append(f"label_smoothing: only meaningful with loss 'cross_entropy', not "
                            f"{loss!r} (the loss chosen for this {bundle.task} target)")
        if cfg.streaming and cfg.min_workers != cfg.max_workers:
            problems.append("workers: an elastic MIN:MAX group needs in-memory data (the "
                            "streaming split depends on the number of workers)")
        problems += data_problems(cfg, bundle)  # --model rnn: a sequence column, its target
        if problems:
            raise ConfigError(problems)
        n_out = output_size(loss, bundle.task, bundle.n_outputs)
        spec = ReplicaSpec(cfg, bundle.n_features, n_out, loss, 0, bundle.stream,
                           bundle.sequence)
        b = spec.batcher(bundle.x_train, bundle.y_train, 0, cfg.world_size)
        spe = b.steps_per_epoch
        if hasattr(b, "close"):
            b.close()
        total = cfg.max_steps if cfg.max_steps else cfg.epochs * spe
        if resume is not None and resume.step >= total:
            raise ConfigError(f"resume: the checkpoint is at step {resume.step}, already at or "
                              f"past the {total} steps asked for (raise --max-steps or "
                              "--epochs)")
        spec = ReplicaSpec(cfg, bundle.n_features, n_out, loss, total, bundle.stream,
                           bundle.sequence)
        return PreparedRun(cfg, bundle, spec, spe, run_dir, resume)

    # --------------------------------------------------------------------- the run
    def fit(self, prep: PreparedRun | None = None) -> Result | None:
        """Train; `prep` is `prepare()`'s result when the caller already has it. None only
        on the ranks other than 0 of ``launcher="mpi"``."""
        from ..metrics.exporter import MetricsExporter

        if self.config.launcher == "mpi" and self.group_factory is None:
            if self.config.local:
                raise ConfigError("launcher: mpi cannot be combined with --local")
            from .mpi_launch import run_mpi
            return run_mpi(self.config, self.started)

        prep = prep if prep is not None else self.prepare()
        cfg = prep.config
        model = prep.spec.build_model()
        exporter = MetricsExporter.from_config(cfg, model.layer_names,
                                               time_buckets=time_buckets(model))
        stop = StopRequest()
        started_ray = False
        observer: RunObserver | None = None
        store = None
        try:
            factory = self.group_factory
            if factory is None and not cfg.local:
                started_ray = _start_ray(cfg)
                from .commitstore import CommitStore
                store = CommitStore.create()
            stop.install()  # after Ray starts: its core replaces an earlier SIGTERM handler
            try:
                exporter.start()
            except OSError as exc:
                raise ConfigError(f"metrics_port: cannot listen on {cfg.metrics_host}:"
                                  f"{cfg.metrics_port} ({exc.strerror}); choose another port "
                                  "or --metrics-port 0 to turn metrics off") from None
            prep.run_dir.create()
            prep.run_dir.write_config(cfg)
            observer = RunObserver(prep, model, exporter)
            coordinator = self._coordinator(prep, model, observer, stop,
                                            factory or _default_factory(prep, store))
            try:
                final = coordinator.run()
            except TrainingFailed as exc:
                where = observer.save_on_failure(coordinator)
                raise TrainingFailed(f"{exc}. Last good checkpoint: {where or 'none'}") from None
        except BaseException:
            exporter.stop()
            raise
        finally:
            stop.restore()
            if store is not None:
                store.close()
            if observer is not None:
                observer.progress.close()
            if started_ray:
                from .raysession import stop_ray
                stop_ray()
        return observer.finish(coordinator, final, stop, self.started)

    def _coordinator(self, prep: PreparedRun, model, observer: RunObserver, stop: StopRequest,
                     factory: GroupFactory) -> Coordinator:
        cfg = prep.config
        placement = make_placement(prep.spec, model, prep.steps_per_epoch)
        if prep.resume is not None:
            commit = Commit(prep.resume.step, prep.resume.arrays,
                            int(prep.resume.meta.get("consecutive_skips", 0)))
        else:  # step 0: the seeded initial parameters and a zero optimizer state
            commit = Commit(0, {"params": model.params.copy(),
                                **prep.spec.build_rule(model).state()})
        cache = None
        if self.group_factory is None and not cfg.local and prep.bundle.stream is None:
            from ..data import write_cache  # Ray actors on this node memory-map it
            cache = str(write_cache(prep.bundle, prep.run_dir.cache_dir))
        group_spec = GroupSpec(prep.spec, cache, os.environ.get("DISTBACKPROP_TEST_FAULTS"))
        return Coordinator(cfg, lambda size: factory(group_spec, size), placement,
                           prep.total_steps, commit, observer, stop=stop,
                           sizer=self._sizer(cfg))

    def _sizer(self, cfg: TrainConfig):
        """Fixed size, or — for `--workers MIN:MAX` on Ray — sized by the free resources."""
        if self.group_factory is not None or cfg.min_workers == cfg.max_workers:
            return FixedSize(cfg.world_size)
        from .raysession import placeable_workers
        return ElasticSize(cfg.min_workers, cfg.max_workers,
                           lambda: placeable_workers(cfg.cpus_per_worker),
                           wait_seconds=cfg.rendezvous_timeout)


def _default_factory(prep: PreparedRun, store=None) -> GroupFactory:
    cfg, bundle = prep.config, prep.bundle
    if cfg.local:
        return lambda spec, size: LocalGroup(spec, bundle.x_train, bundle.y_train)
    return lambda spec, size: RayGroup(spec, size, cfg.rendezvous_timeout, store)


class RunObserver:
    """The coordinator's reports, turned into metrics, history, checkpoints and progress."""

    def __init__(self, prep: PreparedRun, model, exporter):
        from ..metrics.history import HistoryWriter, MemoryHistory
        from ..metrics.memory import model_bytes

        self.prep, self.cfg, self.model, self.exporter = prep, prep.config, model, exporter
        self.history = HistoryWriter(model.layer_names, time_buckets(model))
        self.memory = MemoryHistory()
        self.restarts = 0
        self.resizes = 0
        self.workers_seen: list[int] = []
        # how the group combined gradients: "shm" (θ and gradients shared on one machine,
        # the sharded update), "mpi" (collectives), "none" (one worker)
        self.exchange = "none"
        self.last_checkpoint: Path | None = None
        rd = prep.run_dir
        if prep.resume is not None:
            step = prep.resume.step
            self.restarts = int(prep.resume.meta.get("restarts", 0))
            if rd.history_path.exists():
                self.history.extend_from_parquet(rd.history_path, upto_step=step)
            if rd.memory_path.exists():
                self.memory = MemoryHistory.from_file(rd.memory_path, before_step=step)
        shard = None
        if prep.spec.sharded:  # what one worker holds: its block of the optimizer state
            from ..comm import shard_bounds
            shard = shard_bounds(model.params.size, self.cfg.world_size, 0)
        self.optimizer_bytes = prep.spec.build_rule(model, shard).state_bytes()
        exporter.set_model_bytes(model_bytes(model.params, model.grads,
                                             {"opt": np.zeros(self.optimizer_bytes, np.uint8)}))
        exporter.set_workers(self.cfg.world_size)
        if exporter.enabled:
            exporter.workers_max.set(self.cfg.max_workers)
        exporter.vanish_threshold.set(self.cfg.vanish_threshold)  # before the first chunk
        exporter.explode_threshold.set(self.cfg.explode_threshold)
        self.progress = _Progress(prep.total_steps, prep.resume.step if prep.resume else 0,
                                  quiet=self.cfg.quiet)
        for note in prep.bundle.notes:
            self.progress.write(f"data: {note}")
        for warning in getattr(prep.bundle, "warnings", ()):
            print(f"distbackprop: warning: {warning}", file=sys.stderr)
        self._t_chunk = time.time()

    def on_chunk(self, stats: dict[str, np.ndarray], memory: dict[int, dict],
                 workers: int) -> None:
        now = time.time()
        k = len(stats["step"])
        self.history.append({**stats, "workers": np.full(k, workers, np.int64)})
        self.exporter.record_chunk(stats, self.cfg.vanish_threshold, self.cfg.explode_threshold,
                                   wall_seconds=now - self._t_chunk)
        self._t_chunk = now
        self.exporter.record_workers(memory)
        self.exporter.set_workers(workers)
        self.exchange = "none" if workers == 1 else \
            "shm" if memory.get(0, {}).get("shared_bytes") else "mpi"
        if self.workers_seen and workers != self.workers_seen[-1]:
            self.resizes += 1
        self.workers_seen.append(workers)
        if k:
            self.memory.append(int(stats["step"][-1]), memory)
            self.progress.update(int(stats["step"][-1]) + 1, float(stats["loss"][-1]))

    def on_commit(self, commit: Commit) -> None:
        every, total = self.cfg.checkpoint_every, self.prep.total_steps
        if every and (commit.step % every == 0 or commit.step == total):
            self.checkpoint(commit)

    def on_restart(self, why: str, reason: str, resume_step: int) -> None:
        self.exporter.inc_restarts(reason=reason)
        if reason == "resize":
            self.progress.write(f"resizing: {why}; restarting the group from step "
                                f"{resume_step}")
            return
        self.restarts += 1
        self.progress.write(f"worker failure: {why}; restarting the group from step "
                            f"{resume_step}")

    def on_rewind(self, step: int) -> None:
        """A recovery resumes at `step`: the rows of later steps will be recorded again."""
        self.history.truncate(step)
        self.memory.truncate(step)

    def checkpoint(self, commit: Commit) -> Path:
        spe = self.prep.steps_per_epoch
        c = self.cfg
        meta = {"step": commit.step, "epoch": commit.step // spe, "position": commit.step % spe,
                "config": c.to_dict(), "restarts": self.restarts,
                "consecutive_skips": commit.consecutive_skips,
                "data_order": {"seed": c.seed, "steps_per_epoch": spe}}
        self.last_checkpoint = self.prep.run_dir.save_checkpoint(
            commit.step, commit.resolved(), meta, keep=c.keep_checkpoints)
        return self.last_checkpoint

    def save_on_failure(self, coordinator: Coordinator) -> Path | None:
        """The history so far, and a checkpoint of the newest commit held on this node."""
        rd = self.prep.run_dir
        self.history.write(rd.history_path)
        try:
            safe = coordinator.keeper.safe(timeout=10)
            if safe.step > 0 and (self.last_checkpoint is None
                                  or not self.last_checkpoint.name.endswith(f"{safe.step:08d}")):
                self.checkpoint(safe)
        except Exception:  # noqa: BLE001 - the failure being reported matters more
            pass
        return self.last_checkpoint or rd.newest_checkpoint_path()

    def finish(self, coordinator: Coordinator, final: Commit, stop: StopRequest,
               started: float) -> Result:
        """Write model, history, memory, summary (and, when stopped, a checkpoint)."""
        prep, rd = self.prep, self.prep.run_dir
        interrupted = coordinator.state is State.STOPPED
        if interrupted and final.step > 0:
            self.checkpoint(final)
        self.model.params[...] = final.resolved()["params"]
        summary = _summary(prep, self.model, coordinator, self, started, interrupted)
        meta = prep.bundle.model_meta()
        meta.update({"loss": prep.spec.loss, "config": self.cfg.to_dict()})
        rd.write_model(self.model, meta)
        self.history.write(rd.history_path)
        if len(self.memory):
            self.memory.write(rd.memory_path)
        rd.write_summary(summary)
        self.exporter.set_workers(0)  # over: TrainingStalled must not fire while lingering
        linger = 0.0 if interrupted else self.cfg.metrics_linger
        if linger and self.exporter.enabled:
            self.progress.write(f"metrics stay at {self.exporter.url} for {linger:g} s")
        self.exporter.stop(linger=linger)
        return Result(summary, self.history.to_table(), self.model, rd.path,
                      tuple(coordinator.worker_pids),
                      exit_status=(stop.exit_status or 130) if interrupted else 0)


def _summary(prep: PreparedRun, model, coordinator: Coordinator, obs: RunObserver,
             started: float, interrupted: bool) -> dict[str, Any]:
    from ..nn.losses import loss_value
    st, bundle, loss = coordinator.stats, prep.bundle, prep.spec.loss
    train_seconds = max((st.last_step_end or 0) - (st.first_step_start or 0), 1e-9)
    seen = obs.workers_seen or [prep.config.world_size]
    out: dict[str, Any] = {
        "train_loss": summarize_losses([obs.history.to_table().column("loss").to_numpy()],
                                       prep.steps_per_epoch),
        "val_loss": None,
        "steps": coordinator.step,
        "epochs": coordinator.step / prep.steps_per_epoch,
        "samples_per_second": st.samples / train_seconds,
        "startup_seconds": (st.first_step_start or time.time()) - started,
        "wall_seconds": time.time() - started,
        "workers": seen[-1],
        "restarts": obs.restarts,
        "resizes": obs.resizes,
        "min_workers_seen": min(seen),
        "recovery_seconds": st.recovery_seconds,
        "failures": st.failures,
        "skipped_steps": st.skipped,
        "coordination_seconds_per_step": st.coordination_seconds_per_step(),
        "coordination": st.coordination(),
        "optimizer_bytes_per_worker": obs.optimizer_bytes,
        "gradient_exchange": obs.exchange,
        "status": "interrupted" if interrupted else "finished",
        "loss": loss,
        "task": bundle.task,
    }
    if bundle.x_val is not None and len(bundle.x_val):
        y_hat = model.predict(bundle.x_val)
        out["val_loss"] = loss_value(loss, y_hat, bundle.y_val)
        if bundle.task == "classification":
            pred = (y_hat[:, 0] > 0).astype(np.int64) if y_hat.shape[1] == 1 else \
                y_hat.argmax(axis=1)
            out["val_accuracy"] = float(np.mean(pred == bundle.y_val))
    return out


def _resume_point(cfg: TrainConfig) -> tuple[RunDir, Checkpoint | None]:
    """The run directory, and the checkpoint to continue from (None: start fresh).

    `--resume DIR` must find a checkpoint; `--resume auto` continues `--out DIR`
    when it holds one and starts fresh otherwise.
    """
    if cfg.resume is None:
        return RunDir(cfg.out), None
    if cfg.resume == "auto":
        rd = RunDir(cfg.out)
        if not rd.config_path.exists():
            return rd, None
        return rd, rd.latest_checkpoint()
    rd = RunDir(cfg.resume)
    found = rd.latest_checkpoint()
    if found is None:
        raise ConfigError(f"resume: no valid checkpoint under {rd.path}/checkpoints")
    return rd, found


def _resumed_config(cfg: TrainConfig, rd: RunDir) -> TrainConfig:
    """Fields that fix the model and data order come from the run being resumed."""
    saved = rd.read_config()
    default = TrainConfig()
    changed = [f for f in _RESUME_FIXED if getattr(cfg, f) != getattr(default, f)
               and getattr(cfg, f) != getattr(saved, f)]
    if changed:
        raise ConfigError([f"{f}: cannot change when resuming (run has "
                           f"{getattr(saved, f)!r}, asked {getattr(cfg, f)!r})"
                           for f in changed])
    return cfg.replace(**{f: getattr(saved, f) for f in _RESUME_FIXED})


def _start_ray(cfg: TrainConfig) -> bool:
    """Join `--ray-address`/RAY_ADDRESS or start a private instance; refuse a group the
    cluster can never place. Returns True when Ray was started here."""
    from .raysession import RayUnreachable, cluster_cpus, start_ray, stop_ray
    need = cfg.min_workers * cfg.cpus_per_worker
    try:
        started = start_ray(cfg.effective_ray_address,
                            max(os.cpu_count() or 1, cfg.max_workers * cfg.cpus_per_worker))
    except RayUnreachable as exc:
        raise TrainingFailed(str(exc)) from None
    have = cluster_cpus()
    if need > have:
        if started:
            stop_ray()
        raise ConfigError(f"workers: {cfg.min_workers} workers × {cfg.cpus_per_worker} CPU "
                          f"need {need} CPUs; the Ray cluster has {have:g}")
    return started


class _Progress:
    """A tqdm bar on a terminal; silent otherwise or with --quiet."""

    def __init__(self, total: int, initial: int, quiet: bool):
        self.bar = None
        self.done = initial
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        self.quiet = quiet

    def update(self, done: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(done - self.done)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.done = done

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        elif not self.quiet:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["GroupFactory", "PreparedRun", "Result", "RunObserver", "Trainer", "TrainingFailed"]
