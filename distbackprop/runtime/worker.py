"""`Worker`: one data-parallel replica as a plain class (Ray wraps it in a thin actor).

Per step the worker is a `GradientSource`: its slice of the global batch →
forward → backward into the flat gradient buffer → in-place SUM allreduce →
health of the reduced gradient → the collective skip decision. With the
replicated update placement it also runs the step loop (`run_chunk`) with the
coordinator's `UpdateRule`, so every replica applies the same arithmetic to the
same reduced gradient and they stay identical (`checksum()` verifies it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import TrainConfig
from ..metrics.health import StepStats, grad_health
from ..nn.losses import loss_and_grad
from ..nn.model import loss_grad_buffer
from ..nn.params import FlatModel, Storage
from ..optim import UpdateRule
from .models import build_model
from .step import Gradient, SkipPolicy, run_steps_


class StopAgreed(Exception):
    """Some rank was asked to stop (`Worker.request_stop`): the chunk ends here."""


# Seconds between samples of a worker's open fds and threads (see `Worker.memory`).
HANDLES_EVERY = 10.0


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica needs to build itself; small, so it travels to Ray actors cheaply."""

    config: TrainConfig
    n_in: int
    n_out: int
    loss: str
    total_steps: int
    stream: Any = None  # a StreamPlan in --streaming mode
    sequence: tuple[int, int] | None = None  # (T, F) of sequence rows (--model rnn)

    def build_model(self, storage: Storage | None = None) -> FlatModel:
        """The configured model (`models.build_model`), seeded alike on every replica; its
        flat arrays in `storage`'s when given."""
        return build_model(self.config, self.n_in, self.n_out, self.sequence, storage)

    def build_rule(self, model: FlatModel, shard: tuple[int, int] | None = None) -> UpdateRule:
        """The coordinator's update rule over `model`'s flat buffer (or its block `shard`),
        one segment per layer."""
        return UpdateRule.from_config(self.config, model.params.size, model.dtype,
                                      list(model.layer_slices().values()), self.total_steps,
                                      shard=shard)

    @property
    def sharded(self) -> bool:
        """ZeRO-1 (`--update-on sharded`, the default) among workers; `--local` is one
        replica that updates everything itself."""
        return self.config.update_on == "sharded" and not self.config.local

    def skip_policy(self) -> SkipPolicy:
        return SkipPolicy(self.config.on_nonfinite, self.config.max_consecutive_skips)

    def batcher(self, x, y, rank: int, world: int):
        """In-memory `Batcher` over (x, y), or a `StreamingBatcher` over the stream plan."""
        c = self.config
        if self.stream is not None:
            from ..data import StreamingBatcher
            return StreamingBatcher(self.stream, batch_size=c.batch_size, seed=c.seed,
                                    rank=rank, world=world)
        from ..data import Batcher
        return Batcher(x, y, c.batch_size, c.seed, rank=rank, world=world)


class Worker:
    """One replica: model, update rule and its state, data shard, communicator.

    `x, y` are this node's training arrays (memory-mapped views in the
    distributed runtime; None when streaming); the `Batcher` cuts this rank's
    slice of each global batch, so every rank sees exactly its share of the
    one-process batch.
    """

    def __init__(self, spec: ReplicaSpec, rank: int, world: int, x: np.ndarray | None = None,
                 y: np.ndarray | None = None, comm=None):
        from ..comm import LocalComm

        self.spec, self.config, self.rank, self.world = spec, spec.config, rank, world
        self.comm = comm if comm is not None else LocalComm()
        self._use_model(spec.build_model())
        self._slice_map = self.model.layer_slices()
        self.shard = self._sharded_grad = self.node = None
        if spec.sharded:
            from .sharding import Shard, ShardedGradient, ShardedRule
            self.shard = Shard(self.model.params.size, rank, world, self._slice_map)
            self._sharded_grad = ShardedGradient(self.shard, self.model.dtype)
            self.rule = ShardedRule(spec.build_rule(self.model, (self.shard.lo, self.shard.hi)),
                                    self.shard, lambda: self.comm)
        else:
            self.rule = spec.build_rule(self.model)
        self.policy = spec.skip_policy()
        self.batcher = spec.batcher(x, y, rank, world)
        self.steps_per_epoch = self.batcher.steps_per_epoch
        # [Σ local loss, Σ non-finite flags] + for --model rnn Σ_rows ‖∂L/∂h_t‖² (T,): the
        # per-time squared norms are sums over batch rows, so their SUM over the ranks' row
        # slices is the one-process value — reduced in this same allreduce, then sqrt.
        n_time = 0 if self._time_sq is None else self._time_sq.size
        self._ctrl = np.zeros(3 + n_time, dtype=np.float64)  # [loss, bad, time…, stop]
        self._t = np.zeros(5)  # phase boundaries of the current step (perf_counter)
        self._phases = np.zeros(4)
        self._stats = StepStats(1, self.model.layer_names)
        self._consecutive = 0  # the non-finite policy's count after the last chunk run
        self._bucketer = None
        self._make_bucketer()
        self.peak_activation_bytes = 0
        self._process = None  # psutil.Process of this worker, made on first use
        self._rss = None  # its RSS reader (`SelfRss`), made with it
        self._stop = False  # see request_stop
        self._handles: dict[str, int] | None = None  # open fds and threads, sampled at
        self._handles_at = 0.0  # (time.monotonic())
        self._share_node()

    def _use_model(self, model: FlatModel) -> None:
        self.model = model
        # `net` runs the passes: the model itself, or gradient checkpointing over its buffer.
        self.net = model
        if self.config.remat_every:
            from ..nn.remat import CheckpointedMLP
            self.net = CheckpointedMLP(model, self.config.remat_every)
        self._time_sq = getattr(model, "time_sq", None)

    # state ------------------------------------------------------------------------
    def set_comm(self, comm) -> None:
        self.comm = comm
        self._make_bucketer()
        self._share_node()

    def _share_node(self) -> None:
        """Sharded update with every rank on this machine (`--node-shm`): the model moves
        onto `NodeBuffers` — θ shared by the ranks, each rank's gradient readable by all —
        so a step combines gradients and parameters without MPI copying them (see
        `sharding`). Collective; elsewhere (ranks on several machines, one rank, no room
        in /dev/shm) nothing changes and the step uses Reduce_scatter and Allgather."""
        if self.shard is None or self.comm.size == 1 or not self.config.node_shm \
                or self.node is not None:
            return
        from .sharding import NodeBuffers
        node = NodeBuffers.open(self.comm, self.model.params.size, self.model.dtype)
        if node is None:
            return
        old = self.model.params
        # every rank writes the same seeded initialisation into the shared θ, then the
        # barrier; then each its block of the θ it had (the same on every rank)
        model = self.spec.build_model(node.storage(self.rank))
        self.comm.barrier()
        lo, hi = self.shard.lo, self.shard.hi
        model.params[lo:hi] = old[lo:hi]
        self.comm.barrier()
        self._use_model(model)
        self.node = self._sharded_grad.node = node
        self.rule.shared = True

    def _make_bucketer(self) -> None:
        """`--overlap`: buckets of the flat gradient, each reduced as soon as backward fills it."""
        self._bucketer = None
        if self.config.overlap and self.comm.size > 1 and self.shard is None:
            from ..comm import BucketedAllreduce
            self._bucketer = BucketedAllreduce(
                self.comm, self.model.grads,
                [(n, self._slice_map[n]) for n in reversed(self.model.layer_names)])

    def commit_state(self, into: dict[str, np.ndarray] | None = None
                     ) -> dict[str, np.ndarray] | None:
        """The whole training state on rank 0 — params and the update rule's state (views,
        copied or serialised at once by the caller) — and None on other ranks. Collective
        when the update is sharded: the optimizer's blocks are gathered to rank 0.

        `into` (rank 0): arrays shaped like `full_state_template()` (a commit slot in
        shared memory) that receive the state instead, gathered blocks included; returned.
        """
        if self.shard is not None:
            opt = self.rule.gather_full(self.comm, into)
            if opt is None:
                return None
        elif self.rank == 0:
            opt = self.rule.state_views()
        else:
            return None
        state = {"params": self.model.params, **opt}
        if into is None:
            return state
        for k, v in state.items():
            if v is not into[k]:
                into[k][...] = v
        return into

    def write_state_block(self, into: dict[str, np.ndarray]) -> None:
        """This rank's part of the whole state, written into `into` (arrays shaped like
        `full_state_template()`: a commit slot every rank of the group maps).

        Elements [lo, hi) of θ (P,) and of every per-parameter optimizer array — the block
        this rank updates when the update is sharded, `shard_counts`' split of P
        otherwise — and, on rank 0, the rest (e.g. Adam's step count). Together the
        ranks write the whole state once, in parallel; not collective (the caller fences
        it)."""
        n = self.model.params.size
        if self.shard is not None:
            lo, hi = self.shard.lo, self.shard.hi
        else:
            from .sharding import shard_counts
            counts = shard_counts(n, self.world)
            lo = int(counts[:self.rank].sum())
            hi = lo + int(counts[self.rank])
        into["params"][lo:hi] = self.model.params[lo:hi]
        for k, v in self.rule.state_views().items():
            if self.shard is not None and self.rule.elementwise(k):
                into[k][lo:hi] = v  # this rank's block is all it holds
            elif self.shard is None and v.shape == (n,):
                into[k][lo:hi] = v[lo:hi]
            elif self.rank == 0:
                into[k][...] = v

    def full_state_template(self) -> dict[str, np.ndarray]:
        """Zero arrays shaped like the whole state (what `commit_state` returns on rank 0)."""
        out = {"params": np.zeros_like(self.model.params)}
        for k, v in self.rule.state_views().items():
            whole = self.shard is not None and self.rule.elementwise(k)
            out[k] = np.zeros(self.model.params.size if whole else v.shape, v.dtype)
        return out

    def state(self) -> dict[str, np.ndarray]:
        """A copy of `commit_state()` (a one-rank group: `--local`, or rank 0 under mpiexec)."""
        return {k: v.copy() for k, v in self.commit_state().items()}

    def load_state_(self, state: dict[str, np.ndarray]) -> None:
        """Load a whole state (any worker count wrote it: a sharded rank takes its block).
        Collective when θ is shared (`NodeBuffers`): each rank writes its block of θ,
        between two barriers (no rank still reads the old θ, none goes on before the new
        one is whole)."""
        if self.node is not None:
            lo, hi = self.shard.lo, self.shard.hi
            self.comm.barrier()
            self.model.params[lo:hi] = state["params"][lo:hi]
            self.comm.barrier()
        else:
            self.model.params[...] = state["params"]
        if self.shard is not None:
            self.rule.load_full_(state)
        else:
            self.rule.load_state_(state)

    def set_params_(self, params: np.ndarray) -> None:
        self.model.params[...] = params

    def checksum(self) -> tuple[float, float]:
        """A bit-level fingerprint of the parameters: replicas must agree bit for bit."""
        from ..comm import local_checksum
        return local_checksum(self.model.params)

    def memory(self) -> dict[str, int]:
        """RSS, peak RSS, peak activation bytes, open fds and threads of this process, and
        the bytes of the machine-shared θ and gradients it maps (`NodeBuffers`; 0: none).

        Sampled after every chunk: RSS and the peaks each time (`SelfRss`), the fd and
        thread counts (leak indicators, ~0.5 ms of /proc reads in a busy worker) at most
        every `HANDLES_EVERY` seconds."""
        from ..metrics.memory import SelfRss, peak_rss_bytes, process_handles
        if self._process is None:
            import psutil
            self._process, self._rss = psutil.Process(), SelfRss()
        now = time.monotonic()
        if self._handles is None or now - self._handles_at >= HANDLES_EVERY:
            self._handles, self._handles_at = process_handles(self._process), now
        return {"rss_bytes": self._rss(), "peak_rss_bytes": peak_rss_bytes(),
                "activation_bytes": int(self.peak_activation_bytes),
                "shared_bytes": 0 if self.node is None else self.node.nbytes, **self._handles}

    # the gradient ---------------------------------------------------------------------
    def local_gradient_(self, step: int) -> tuple[float, int]:
        """Forward + backward of this rank's slice of global `step`; fills `model.grads`
        with Σ_{rows of this rank} ∂ℓ/∂θ / B_global. Returns (local loss, B_global)."""
        t = self._t
        t[0] = time.perf_counter()
        epoch, pos = divmod(step, self.steps_per_epoch)
        x, y, global_count = self.batcher.batch(epoch, pos)
        t[1] = time.perf_counter()
        y_hat = self.net.forward(x)
        self.peak_activation_bytes = max(self.peak_activation_bytes,
                                         self.net.activation_bytes())
        t[2] = time.perf_counter()
        dy = loss_grad_buffer(self, y_hat)
        local_loss = loss_and_grad(self.spec.loss, y_hat, y, float(global_count), dy,
                                   label_smoothing=self.config.label_smoothing)
        hook = self._bucketer.mark_ready_ if self._bucketer is not None else None
        self.net.backward(dy, on_layer_done=hook)
        return local_loss, global_count

    def request_stop(self) -> None:
        """A stop (from another thread): the running chunk ends before the update of the
        step in which every rank learns of it, and later chunks run no step. The request
        travels in each step's control allreduce, so the ranks agree on that step."""
        self._stop = True

    def gradient(self, step: int) -> Gradient:
        """The global mean gradient of `step` (identical on every rank), its health, and
        the skip decision. The loss and a non-finite flag travel in one SUM-allreduce of
        two floats (a SUM of 0/1 flags > 0 is their MAX), so every rank decides alike
        even when only one rank's data showed the problem.

        Raises `StopAgreed` (before the update) when some rank was asked to stop
        (`request_stop`): that allreduce carries the requests too."""
        t = self._t
        local_loss, samples = self.local_gradient_(step)
        t[3] = time.perf_counter()
        if self._sharded_grad is not None:
            loss, h, skip = self._sharded_grad.reduce_(self.comm, self.model.grads, local_loss,
                                                       not math.isfinite(local_loss),
                                                       extra=self._time_sq, stop=self._stop)
            if self._sharded_grad.stop:
                raise StopAgreed(step)
            self._add_time_norms(h, self._time_sq)
            t[4] = time.perf_counter()
            np.subtract(t[1:], t[:-1], out=self._phases)
            return Gradient(loss, samples, self._sharded_grad.grads, h, skip, self._phases)
        if self._bucketer is not None:
            self._bucketer.wait_all()
        else:
            self.comm.allreduce_(self.model.grads)
        h = grad_health(self.model.grads, self._slice_map)
        self._ctrl[0] = local_loss
        self._ctrl[1] = 0.0 if (math.isfinite(local_loss) and not h["nonfinite"]
                                and math.isfinite(h["grad_global_norm"])) else 1.0
        if self._time_sq is not None:
            self._ctrl[2:-1] = self._time_sq
        self._ctrl[-1] = 1.0 if self._stop else 0.0
        self.comm.allreduce_(self._ctrl)
        if self._ctrl[-1] > 0:
            raise StopAgreed(step)
        self._add_time_norms(h, None if self._time_sq is None else self._ctrl[2:-1])
        t[4] = time.perf_counter()  # the allreduce phase includes health and the decision
        np.subtract(t[1:], t[:-1], out=self._phases)
        return Gradient(float(self._ctrl[0]), samples, self.model.grads, h,
                        bool(self._ctrl[1] > 0), self._phases)

    def _add_time_norms(self, health: dict, time_sq: np.ndarray | None) -> None:
        """--model rnn: health["time_grad_norm"] ← per-bucket RMS ‖∂L/∂h_t‖ from the reduced
        Σ‖∂L/∂h_t‖² (T,); StepStats records it like the per-layer norms."""
        if time_sq is not None:
            health["time_grad_norm"] = self.model.bucket_norms(time_sq)

    def sharpness(self, step: int) -> float:
        """Top Hessian eigenvalue on this step's global batch (collective: every rank calls it).

        Power iteration on Hessian-vector products (Pearlmutter's R-operator), each
        allreduced; the start vector is seeded by `step`, identical on every rank.
        """
        from ..nn.hessian import top_eigenvalue
        epoch, pos = divmod(step, self.steps_per_epoch)
        x, y, global_count = self.batcher.batch(epoch, pos)
        return top_eigenvalue(self.model, x, y, self.spec.loss, iters=20,
                              rng=np.random.default_rng([self.config.seed, step]),
                              denom=float(global_count), comm=self.comm)

    # placements -------------------------------------------------------------------------
    def run_chunk(self, start: int, k: int, consecutive_skips: int | None = None
                  ) -> dict[str, Any]:
        """Replicated placement: steps [start, start + k) with the update on this replica.

        `consecutive_skips` is the non-finite policy's count before `start`; None goes on
        from this worker's own count after its previous chunk (a chunk the coordinator
        queued before it had seen the previous one's results). Returns per-step stats,
        the consecutive-skip count after them, memory and rank.
        """
        c = self.config
        if consecutive_skips is None:
            consecutive_skips = self._consecutive
        try:
            consecutive = run_steps_(self, self.rule, self.model.params, start, k,
                                     self.steps_per_epoch, self._stats, self.policy,
                                     consecutive_skips,
                                     self.sharpness if c.sharpness_every else None,
                                     c.sharpness_every)
        except StopAgreed:  # before that step's update: the steps recorded are the chunk
            consecutive = consecutive_skips
            for skipped in self._stats.skipped[:self._stats.n]:
                consecutive = self.policy.count(consecutive, bool(skipped))
        self._consecutive = consecutive
        return {"stats": self._stats.as_dict(), "consecutive_skips": consecutive,
                "memory": self.memory(), "rank": self.rank}

    def reduced_gradient(self, step: int, params: np.ndarray | None) -> dict[str, Any]:
        """Coordinator placement: set `params`, compute the reduced gradient of `step`;
        rank 0 also returns a copy of the gradient for the coordinator's update."""
        if params is not None:
            self.set_params_(params)
        g = self.gradient(step)
        out: dict[str, Any] = {"rank": self.rank, "loss": g.loss, "samples": g.samples,
                               "health": g.health, "skip": g.skip, "phases": g.phases,
                               "memory": self.memory()}
        if self.rank == 0:
            out["grads"] = g.grads.copy()
        return out


__all__ = ["ReplicaSpec", "Worker"]
