"""`Worker`: one data-parallel replica as a plain class (Ray wraps it in a thin actor).

One call runs a chunk of K steps; per step:
forward → backward into the flat gradient buffer → in-place SUM allreduce →
health statistics on the reduced gradient → collective skip decision → update.
Replicas apply the same arithmetic to the same reduced gradient, so they stay
identical; `checksum()` lets the coordinator verify that every chunk.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import TrainConfig
from ..nn import MLP
from ..nn.losses import loss_and_grad
from ..nn.model import loss_grad_buffer
from ..optim import Optimizer, Schedule, clip_grad_norm_, make_optimizer

PHASES = ("data", "forward", "backward", "allreduce", "update")


@dataclass
class Faults:
    """Test-only fault injection, from DISTBACKPROP_TEST_FAULTS (JSON); never set in production.

    Each kind maps a global step to the ranks it hits. With ``dir`` set, a fault
    fires once: a marker file records it, so the replay after a recovery runs clean.
    ``pause_at`` writes ``<dir>/pause-<step>-<rank>.pid`` and sleeps, so a test can
    SIGKILL the worker by PID from outside at a known step.
    """

    nan_at: dict[int, list[int]] = field(default_factory=dict)
    hang_at: dict[int, list[int]] = field(default_factory=dict)
    exit_at: dict[int, list[int]] = field(default_factory=dict)
    pause_at: dict[int, list[int]] = field(default_factory=dict)
    perturb_at: dict[int, list[int]] = field(default_factory=dict)  # nudge one replica
    dir: str | None = None

    KINDS = ("nan_at", "hang_at", "exit_at", "pause_at", "perturb_at")

    @classmethod
    def from_env(cls) -> Faults:
        import json
        raw = os.environ.get("DISTBACKPROP_TEST_FAULTS")
        if not raw:
            return cls()
        d = json.loads(raw)
        conv = {k: {int(s): list(r) for s, r in d.get(k, {}).items()} for k in cls.KINDS}
        return cls(**conv, dir=d.get("dir"))

    def hits(self, kind: str, step: int, rank: int) -> bool:
        if rank not in getattr(self, kind).get(step, ()):
            return False
        if self.dir is None:
            return True
        marker = os.path.join(self.dir, f"{kind}-{step}-{rank}")
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def fire(self, step: int, rank: int, grads: np.ndarray, params: np.ndarray) -> None:
        if self.hits("nan_at", step, rank):
            grads[0] = np.nan
        if self.hits("perturb_at", step, rank):
            params[0] += 1e-3
        if self.hits("hang_at", step, rank):
            time.sleep(3600)
        if self.hits("exit_at", step, rank):
            os._exit(137)
        if self.hits("pause_at", step, rank):
            path = os.path.join(self.dir or ".", f"pause-{step}-{rank}.pid")
            with open(path + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(path + ".tmp", path)
            time.sleep(120)


def make_batcher(config: TrainConfig, x, y, stream, rank: int, world: int):
    """In-memory `Batcher` over (x, y), or a `StreamingBatcher` over `stream` (a StreamPlan)."""
    if stream is not None:
        from ..data import StreamingBatcher
        return StreamingBatcher(stream, batch_size=config.batch_size, seed=config.seed,
                                rank=rank, world=world)
    from ..data import Batcher
    return Batcher(x, y, config.batch_size, config.seed, rank=rank, world=world)


def build_model(config: TrainConfig, n_in: int, n_out: int) -> MLP:
    """The config's MLP, initialised from `config.seed` (identical on every replica)."""
    return MLP([n_in, *config.hidden, n_out], activation=config.activation,
               dtype=np.dtype(config.dtype), seed=config.seed, init=config.resolved_init)


def build_optimizer(config: TrainConfig, model: MLP) -> Optimizer:
    """The config's optimizer over `model`'s flat buffer, one segment per layer."""
    return make_optimizer(config.optimizer, model.params.size, model.dtype,
                          momentum=config.momentum, weight_decay=config.weight_decay,
                          segments=list(model.layer_slices().values()),
                          threads=config.cpus_per_worker)


def update_(config: TrainConfig, schedule: Schedule, optimizer: Optimizer, params: np.ndarray,
            grads: np.ndarray, step: int, gnorm: float) -> float:
    """The update rule, wherever it runs: clip g to `clip_norm` (using the ‖g‖ already
    computed), then θ ← optimizer(θ, g, lr(step)) in place. Returns lr."""
    lr = schedule(step)
    clip_grad_norm_(grads, config.clip_norm, norm=gnorm)
    optimizer.step_(params, grads, lr)
    return lr


def build_schedule(config: TrainConfig, total_steps: int) -> Schedule:
    return Schedule(config.lr_schedule, config.lr, total_steps, config.warmup_steps,
                    config.lr_step_size, config.lr_gamma)


def pack_state(params: np.ndarray, optimizer: Optimizer) -> dict[str, np.ndarray]:
    """Copies of {"params", "opt/<name>": …}: what commits and checkpoints hold."""
    out = {"params": params.copy()}
    out.update({f"opt/{k}": v.copy() for k, v in optimizer.state.items()})
    return out


def optimizer_part(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The optimizer's arrays of a packed state, under their own names."""
    return {k[4:]: v for k, v in state.items() if k.startswith("opt/")}


class StatsBuffer:
    """Preallocated per-step statistics for one chunk (names as in the team brief)."""

    def __init__(self, k: int, n_layers: int):
        self.k = k
        self.a: dict[str, np.ndarray] = {
            "step": np.zeros(k, np.int64), "epoch": np.zeros(k, np.int64),
            "loss": np.zeros(k), "samples": np.zeros(k, np.int64), "lr": np.zeros(k),
            "grad_global_norm": np.zeros(k), "grad_norm": np.zeros((k, n_layers)),
            "update_ratio": np.zeros((k, n_layers)), "grad_max_abs": np.zeros(k),
            "nonfinite": np.zeros(k, np.int64), "skipped": np.zeros(k, bool),
            "step_seconds": np.zeros(k), "phase_seconds": np.zeros((k, len(PHASES))),
            "sharpness": np.full(k, np.nan),
        }

    def trimmed(self, n: int) -> dict[str, np.ndarray]:
        return {k: v[:n] for k, v in self.a.items()}


class Worker:
    """One replica: model, optimizer state, data shard, communicator.

    `x, y` are this node's training arrays (memory-mapped views in the
    distributed runtime); the rank's share of each global batch is cut by the
    `Batcher`, so every rank sees exactly its slice of the one-process batch.
    """

    def __init__(self, config: TrainConfig, rank: int, world: int, x: np.ndarray | None,
                 y: np.ndarray | None, n_out: int, loss: str, total_steps: int, comm=None,
                 faults: Faults | None = None, stream=None, n_in: int | None = None):
        from ..comm import LocalComm

        self.config, self.rank, self.world = config, rank, world
        self.comm = comm if comm is not None else LocalComm()
        self.loss = loss
        self.model = build_model(config, x.shape[1] if x is not None else n_in, n_out)
        # `net` runs the passes: the model itself, or gradient checkpointing over its buffer.
        self.net = self.model
        if config.remat_every:
            from ..nn.remat import CheckpointedMLP
            self.net = CheckpointedMLP(self.model, config.remat_every)
        self.optimizer = build_optimizer(config, self.model)
        self.schedule = build_schedule(config, total_steps)
        self.total_steps = total_steps
        self.batcher = make_batcher(config, x, y, stream, rank, world)
        self.steps_per_epoch = self.batcher.steps_per_epoch
        self.faults = faults or Faults()
        self.faults_on = any(getattr(self.faults, k) for k in Faults.KINDS)
        self._slice_map = self.model.layer_slices()
        self._slices = list(self._slice_map.values())
        self.max_abs = 0.0
        self._norms = np.zeros(len(self._slices))
        self._ctrl = np.zeros(2, dtype=np.float64)
        self._t = np.zeros(4)  # phase boundaries of the current step (perf_counter)
        self._bucketer = None
        self._make_bucketer()
        self.peak_activation_bytes = 0
        self.consecutive_skips = 0

    # state ------------------------------------------------------------------------
    def set_comm(self, comm) -> None:
        self.comm = comm
        self._make_bucketer()

    def _make_bucketer(self) -> None:
        """`--overlap`: buckets of the flat gradient, each reduced as soon as backward fills it."""
        self._bucketer = None
        if self.config.overlap and self.comm.size > 1:
            from ..comm import BucketedAllreduce
            slices = self.model.layer_slices()
            self._bucketer = BucketedAllreduce(
                self.comm, self.model.grads,
                [(n, slices[n]) for n in reversed(self.model.layer_names)])

    def state(self) -> dict[str, np.ndarray]:
        """Params and optimizer state (copies): what a commit or checkpoint stores."""
        return pack_state(self.model.params, self.optimizer)

    def load_state_(self, state: dict[str, np.ndarray]) -> None:
        self.model.params[...] = state["params"]
        self.optimizer.load_state_(optimizer_part(state))

    def set_params_(self, params: np.ndarray) -> None:
        self.model.params[...] = params

    def checksum(self) -> float:
        """CRC-32 of the parameter bytes: replicas must agree bit for bit."""
        from ..comm import local_checksum
        return local_checksum(self.model.params)

    def memory(self) -> dict[str, int]:
        from ..metrics.memory import peak_rss_bytes, process_handles, rss_bytes
        return {"rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes(),
                "activation_bytes": int(self.peak_activation_bytes), **process_handles()}

    # the step -----------------------------------------------------------------------
    def compute_grad(self, step: int) -> tuple[float, int]:
        """Forward + backward + allreduce for global `step`. Returns (global loss, samples).

        `model.grads` then holds the global mean gradient (identical on every rank).
        """
        t = self._t
        epoch, pos = divmod(step, self.steps_per_epoch)
        x, y, global_count = self.batcher.batch(epoch, pos)
        t[0] = time.perf_counter()
        hook = None
        if self._bucketer is not None:
            hook = self._bucketer.mark_ready_
        y_hat = self.net.forward(x)
        self.peak_activation_bytes = max(self.peak_activation_bytes,
                                         self.net.activation_bytes())
        t[1] = time.perf_counter()
        dy = loss_grad_buffer(self, y_hat)
        local_loss = loss_and_grad(self.loss, y_hat, y, float(global_count), dy)
        self.net.backward(dy, on_layer_done=hook)
        if self.faults_on:
            self.faults.fire(step, self.rank, self.model.grads, self.model.params)
        t[2] = time.perf_counter()
        if self._bucketer is not None:
            self._bucketer.wait_all()
        else:
            self.comm.allreduce_(self.model.grads)
        self._ctrl[0] = local_loss
        self._ctrl[1] = 0.0 if math.isfinite(local_loss) else 1.0
        t[3] = time.perf_counter()
        return local_loss, global_count

    def sharpness(self, step: int) -> float:
        """Top Hessian eigenvalue on this step's global batch (collective: every rank calls it).

        Power iteration on Hessian-vector products (Pearlmutter's R-operator), each
        allreduced; the start vector is seeded by `step`, identical on every rank.
        """
        from ..nn.hessian import top_eigenvalue
        epoch, pos = divmod(step, self.steps_per_epoch)
        x, y, global_count = self.batcher.batch(epoch, pos)
        return top_eigenvalue(self.model, x, y, self.loss, iters=20,
                              rng=np.random.default_rng([self.config.seed, step]),
                              denom=float(global_count), comm=self.comm)

    def health_and_decide(self) -> tuple[float, float, int, bool]:
        """Per-layer norms of the reduced gradient, then the collective skip decision.

        Returns (global loss, global grad norm, non-finite count, skip). The
        skip flag is SUM-allreduced with the loss (a SUM of 0/1 flags > 0 is
        their MAX), so every rank takes the same decision even if its local
        data alone would not have shown the problem.
        """
        from ..metrics.health import grad_health
        h = grad_health(self.model.grads, self._slice_map)
        self._norms[:] = h["grad_norm"]
        self.max_abs = h["grad_max_abs"]
        gnorm, nonfinite = h["grad_global_norm"], int(h["nonfinite"])
        if nonfinite or not math.isfinite(gnorm):
            self._ctrl[1] = 1.0
        self.comm.allreduce_(self._ctrl)
        return float(self._ctrl[0]), gnorm, nonfinite, bool(self._ctrl[1] > 0)

    def reduced_gradient(self, step: int, params: np.ndarray | None) -> dict[str, Any]:
        """`--update-on coordinator`: set `params`, compute the reduced gradient for `step`
        and its health; rank 0 returns a copy of the gradient for the coordinator's update."""
        if params is not None:
            self.set_params_(params)
        t = self._t
        t0 = time.perf_counter()
        _, samples = self.compute_grad(step)
        loss, gnorm, nonfinite, skip = self.health_and_decide()
        out: dict[str, Any] = {
            "rank": self.rank, "loss": loss, "samples": samples, "grad_global_norm": gnorm,
            "grad_norm": self._norms.copy(), "nonfinite": nonfinite, "skipped": skip,
            "grad_max_abs": self.max_abs,
            "phase_seconds": np.array([t[0] - t0, t[1] - t[0], t[2] - t[1], t[3] - t[2], 0.0]),
            "memory": self.memory(),
        }
        if self.rank == 0:
            out["grads"] = self.model.grads.copy()
        return out

    def run_chunk(self, start: int, k: int) -> dict[str, Any]:
        """Run global steps [start, start + k). Returns per-step stats and this worker's memory."""
        t = self._t
        buf = StatsBuffer(k, len(self._slices))
        a = buf.a
        n = 0
        for i in range(k):
            step = start + i
            if self.config.sharpness_every and step % self.config.sharpness_every == 0:
                a["sharpness"][i] = self.sharpness(step)
            t_start = time.perf_counter()
            loss_local, samples = self.compute_grad(step)
            loss, gnorm, nonfinite, skip = self.health_and_decide()
            a["grad_norm"][i] = self._norms
            a["grad_max_abs"][i] = self.max_abs
            if skip:
                lr = self.schedule(step)
                self.consecutive_skips += 1
                a["update_ratio"][i] = 0.0
            else:
                self.consecutive_skips = 0
                lr = update_(self.config, self.schedule, self.optimizer, self.model.params,
                             self.model.grads, step, gnorm)
                a["update_ratio"][i] = self.optimizer.update_ratios()
            t_end = time.perf_counter()
            a["step"][i], a["epoch"][i] = step, step // self.steps_per_epoch
            a["loss"][i], a["samples"][i], a["lr"][i] = loss, samples, lr
            a["grad_global_norm"][i], a["nonfinite"][i], a["skipped"][i] = gnorm, nonfinite, skip
            a["step_seconds"][i] = t_end - t_start
            ph = a["phase_seconds"][i]
            ph[0] = t[0] - t_start
            ph[1] = t[1] - t[0]
            ph[2] = t[2] - t[1]
            ph[3] = t[3] - t[2]
            ph[4] = t_end - t[3]
            n = i + 1
            if (skip and self.config.on_nonfinite == "abort") or \
                    self.consecutive_skips >= self.config.max_consecutive_skips:
                break
        return {"stats": buf.trimmed(n), "memory": self.memory(), "rank": self.rank,
                "consecutive_skips": self.consecutive_skips}
