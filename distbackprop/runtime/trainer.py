"""`Trainer(config).fit() -> Result`: the public entry point, for every execution mode.

It validates the configuration and the data before anything starts, builds
the worker group the configuration asks for (in-process, Ray actors, or the
ranks of an ``mpiexec`` launch), hands it to the `Coordinator`, and writes the
run directory: config.yaml, model.npz, history.parquet, summary.json,
memory.parquet and checkpoints/.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, TrainConfig
from .coordinator import (
    Commit,
    Coordinator,
    CoordinatorHooks,
    TrainingFailed,
    initial_commit,
    summarize_losses,
)
from .group import GroupSpec, LocalGroup, RayGroup
from .worker import build_model

# Config fields that define the model and the data order: a resumed run must not change them.
_RESUME_FIXED = ("hidden", "activation", "init", "dtype", "seed", "batch_size", "loss",
                 "optimizer", "data", "target", "features", "task", "standardize",
                 "val_fraction", "val_data")


@dataclass
class Result:
    """What `fit` returns: `summary` (as summary.json), `history` (pyarrow.Table), `model`."""

    summary: dict[str, Any]
    history: Any
    model: Any
    run_dir: Path
    worker_pids: tuple[int, ...] = ()


def default_loss(task: str) -> str:
    return "cross_entropy" if task == "classification" else "mse"


def output_size(loss: str, task: str, n_outputs: int) -> int:
    """Network outputs for `loss`: one logit for binary classification with bce."""
    return 1 if loss == "bce" and task == "classification" else n_outputs


class Trainer:
    """Train per `config`. ``fit()`` raises `ConfigError` (bad input) or `TrainingFailed`."""

    def __init__(self, config: TrainConfig, *, started: float | None = None):
        self.config = config
        self.started = started if started is not None else time.time()

    # ------------------------------------------------------------------ preparation
    def _prepare(self):
        from ..data import load_training_data

        cfg = self.config.validate()
        resume_meta = None
        if cfg.resume:
            cfg, resume_meta = _resume_config(cfg)
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
        n_out = output_size(loss, bundle.task, bundle.n_outputs)
        if cfg.launcher == "mpi" and cfg.local:
            problems.append("launcher: mpi cannot be combined with --local")
        if problems:
            raise ConfigError(problems)
        return cfg, bundle, loss, n_out, resume_meta

    # --------------------------------------------------------------------- the run
    def fit(self) -> Result:
        cfg, bundle, loss, n_out, resume_meta = self._prepare()
        if cfg.launcher == "mpi":
            from .mpi_launch import run_mpi
            return run_mpi(self, cfg, bundle, loss, n_out, resume_meta)
        return self._fit(cfg, bundle, loss, n_out, resume_meta)

    def _fit(self, cfg, bundle, loss, n_out, resume_meta, group_factory=None) -> Result:
        from ..checkpoint import latest_checkpoint, save_checkpoint
        from ..metrics.exporter import MetricsExporter
        from ..metrics.history import HistoryWriter, MemoryHistory
        from ..metrics.memory import model_bytes

        run_dir = Path(cfg.resume or cfg.out or
                       Path("runs") / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"))
        total, spe = total_steps(cfg, bundle)
        probe = build_model(cfg, bundle.n_features, n_out)
        layers = probe.layer_names

        commit = initial_commit(cfg, bundle.n_features, n_out)
        history = HistoryWriter(layers)
        memhist = MemoryHistory()
        prev_restarts = 0
        if resume_meta is not None:
            found = latest_checkpoint(run_dir)
            if found is None:
                raise ConfigError(f"resume: no valid checkpoint under {run_dir}/checkpoints")
            path, arrays, meta = found
            commit = Commit(int(meta["step"]), dict(arrays))
            prev_restarts = int(meta.get("restarts", 0))
            old = run_dir / "history.parquet"
            if old.exists():
                history.extend_from_parquet(old, upto_step=commit.step)
            if (run_dir / "memory.parquet").exists():
                memhist = MemoryHistory.from_file(run_dir / "memory.parquet",
                                                  before_step=commit.step)
            if commit.step >= total:
                raise ConfigError(f"resume: the checkpoint is at step {commit.step}, already "
                                  f"at or past the {total} steps asked for (raise --max-steps "
                                  "or --epochs)")

        # Everything that can refuse the run happens before the run directory is touched.
        exporter = MetricsExporter.from_config(cfg, layers)
        started_ray = False
        if group_factory is None and not cfg.local:
            started_ray = _ensure_ray(cfg)
        progress = None
        try:
            if group_factory is None and not cfg.local:
                _check_capacity(cfg)
            try:
                exporter.start()
            except OSError as exc:
                raise ConfigError(f"metrics_port: cannot listen on {cfg.metrics_host}:"
                                  f"{cfg.metrics_port} ({exc.strerror}); choose another port "
                                  "or --metrics-port 0 to turn metrics off") from None
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_yaml(run_dir / "config.yaml", cfg)
            opt_bytes = sum(v.nbytes for k, v in commit.resolved().items()
                            if k.startswith("opt/"))
            exporter.set_model_bytes(model_bytes(probe.params, probe.grads, {
                "opt": np.zeros(opt_bytes, np.uint8)}))
            exporter.set_workers(cfg.world_size)
            exporter.vanish_threshold.set(cfg.vanish_threshold)  # before the first chunk too
            exporter.explode_threshold.set(cfg.explode_threshold)

            progress = _Progress(total, commit.step, quiet=cfg.quiet)
            for note in bundle.notes:
                progress.write(f"data: {note}")
            last_ckpt: list[Path | None] = [None]
            state = {"restarts": prev_restarts}
            t_chunk = [time.time()]

            def on_chunk(stats, memory):
                now = time.time()
                history.append(stats)
                exporter.record_chunk(stats, cfg.vanish_threshold, cfg.explode_threshold,
                                      wall_seconds=now - t_chunk[0])
                t_chunk[0] = now
                exporter.record_workers(memory)
                if len(stats["step"]):
                    memhist.append(int(stats["step"][-1]), memory)

            def on_commit(c: Commit):
                if cfg.checkpoint_every and (c.step % cfg.checkpoint_every == 0
                                             or c.step == total):
                    meta = {"step": c.step, "epoch": c.step // spe, "position": c.step % spe,
                            "config": cfg.to_dict(), "restarts": state["restarts"],
                            "data_order": {"seed": cfg.seed, "steps_per_epoch": spe}}
                    last_ckpt[0] = save_checkpoint(run_dir, c.step, c.resolved(), meta,
                                                   keep=cfg.keep_checkpoints)

            def on_restart(why: str):
                state["restarts"] += 1
                exporter.inc_restarts()
                progress.write(f"worker failure: {why}; restarting the group from step "
                               f"{coordinator.commit.step}")

            spec = GroupSpec(cfg, None, n_out, loss, total,
                             faults_json=os.environ.get("DISTBACKPROP_TEST_FAULTS"),
                             stream=bundle.stream, n_in=bundle.n_features)
            if group_factory is None and cfg.local:
                def group_factory():
                    return LocalGroup(spec, bundle.x_train, bundle.y_train)
            elif group_factory is None:
                if bundle.stream is None:
                    from ..data import write_cache
                    spec.cache_path = str(write_cache(bundle, run_dir / ".cache"))

                def group_factory():
                    return RayGroup(spec, cfg.rendezvous_timeout)

            coordinator = Coordinator(
                cfg, group_factory, total, commit, probe, spe,
                CoordinatorHooks(on_chunk=on_chunk, on_commit=on_commit, on_restart=on_restart,
                                 progress=progress.update))
            try:
                final = coordinator.run()
            except TrainingFailed as exc:
                history.write(run_dir / "history.parquet")
                where = last_ckpt[0] or _newest_checkpoint(run_dir)
                raise TrainingFailed(
                    f"{exc}. Last good checkpoint: "
                    f"{where if where else 'none (use --checkpoint-every to write them)'}"
                ) from None
        except BaseException:
            exporter.stop()
            raise
        finally:
            if progress is not None:
                progress.close()
            if started_ray:
                import ray
                ray.shutdown()
        startup = (coordinator.stats.first_step_start or time.time()) - self.started

        model = build_model(cfg, bundle.n_features, n_out)
        model.params[...] = final.resolved()["params"]
        summary = _summary(cfg, bundle, loss, model, coordinator, spe, startup, self.started,
                           state["restarts"])
        meta = bundle.model_meta()
        meta.update({"loss": loss, "config": cfg.to_dict()})
        model.save(run_dir / "model.npz", meta=meta)
        history.write(run_dir / "history.parquet")
        if len(memhist):
            memhist.write(run_dir / "memory.parquet")
        tmp = run_dir / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=float) + "\n")
        os.replace(tmp, run_dir / "summary.json")
        exporter.set_workers(0)  # training is over: TrainingStalled must not fire while lingering
        if cfg.metrics_linger and exporter.enabled:
            progress.write(f"metrics stay at {exporter.url} for {cfg.metrics_linger:g} s")
        exporter.stop(linger=cfg.metrics_linger)
        return Result(summary, history.to_table(), model, run_dir,
                      tuple(coordinator.worker_pids))


def total_steps(cfg: TrainConfig, bundle) -> tuple[int, int]:
    """(total steps, steps per epoch): `--max-steps` when given (it overrides --epochs).

    Streaming: every rank takes the same number of steps per epoch (the
    minimum over ranks), which depends on the number of workers.
    """
    from .worker import make_batcher
    b = make_batcher(cfg, bundle.x_train, bundle.y_train, bundle.stream, 0, cfg.world_size)
    spe = b.steps_per_epoch
    if hasattr(b, "close"):
        b.close()
    return (cfg.max_steps if cfg.max_steps else cfg.epochs * spe), spe


def _summary(cfg, bundle, loss, model, coordinator, spe, startup, started,
             restarts) -> dict[str, Any]:
    from ..nn.losses import loss_value
    st = coordinator.stats
    train_seconds = max((st.last_step_end or 0) - (st.first_step_start or 0), 1e-9)
    out: dict[str, Any] = {
        "train_loss": summarize_losses(st.losses, spe),
        "val_loss": None,
        "steps": coordinator.commit.step,
        "epochs": coordinator.commit.step / spe,
        "samples_per_second": st.samples / train_seconds,
        "startup_seconds": startup,
        "wall_seconds": time.time() - started,
        "workers": cfg.world_size,
        "restarts": restarts,
        "recovery_seconds": st.recovery_seconds,
        "failures": st.failures,
        "skipped_steps": st.skipped,
        "coordination_seconds_per_step": st.coordination_seconds_per_step(),
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
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in out.items()}


def _resume_config(cfg: TrainConfig) -> tuple[TrainConfig, dict]:
    """Fields that fix the model and data order come from the run being resumed."""
    import yaml
    path = Path(cfg.resume) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"resume: {path} not found (not a distbackprop run directory)")
    saved = TrainConfig.from_dict(yaml.safe_load(path.read_text()) or {}, source=str(path))
    changed = [f for f in _RESUME_FIXED if getattr(cfg, f) != getattr(TrainConfig(), f)
               and getattr(cfg, f) != getattr(saved, f)]
    if changed:
        raise ConfigError([f"{f}: cannot change when resuming (run has "
                           f"{getattr(saved, f)!r}, asked {getattr(cfg, f)!r})"
                           for f in changed])
    merged = cfg.replace(**{f: getattr(saved, f) for f in _RESUME_FIXED})
    return merged, {"config": saved}


def _newest_checkpoint(run_dir: Path) -> Path | None:
    from ..checkpoint import list_checkpoints
    cps = list_checkpoints(run_dir)
    return cps[-1] if cps else None


def _write_yaml(path: Path, cfg: TrainConfig) -> None:
    import yaml
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)


def _ensure_ray(cfg: TrainConfig) -> bool:
    """Join `--ray-address`/RAY_ADDRESS, reuse an initialised Ray, or start a local one.

    Returns True when this call started Ray (and so must shut it down).
    """
    import ray
    if ray.is_initialized():
        return False
    # Ray's usage-stats report tries to reach the internet at start-up; on a closed
    # network that costs seconds of start-up (measured here: ray.init 8.9 s → 4.0 s).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.effective_ray_address
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        need = cfg.workers * cfg.cpus_per_worker
        ray.init(num_cpus=max(os.cpu_count() or 1, need), **kwargs)
    return True


def _check_capacity(cfg: TrainConfig) -> None:
    """Refuse, before any actor starts, a group the cluster can never place."""
    import ray
    have = ray.cluster_resources().get("CPU", 0)
    need = cfg.workers * cfg.cpus_per_worker
    if need > have:
        raise ConfigError(f"workers: {cfg.workers} workers × {cfg.cpus_per_worker} CPU need "
                          f"{need} CPUs; the Ray cluster has {have:g}")


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


__all__ = ["Trainer", "Result", "TrainingFailed"]
