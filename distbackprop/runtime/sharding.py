"""The sharded update (`--update-on sharded`, ZeRO stage 1) on the flat buffers.

Rank r owns the contiguous block [lo, hi) of the flat parameter vector (blocks
as `np.array_split` cuts them). Per step:

    g_r  = Reduce_scatter(g)            rank r receives Σ_ranks g[lo:hi]
    θ[lo:hi] ← rule(θ[lo:hi], g_r)      with only its block of the optimizer state
    θ    = Allgather(θ[lo:hi])          in place: every rank holds the whole θ again

— the same bytes on the wire as one allreduce, and 1/N of the update's memory
traffic and optimizer state per rank. What needs the whole gradient (global
norm for clipping and health, per-layer norms, the non-finite flag) comes from
per-block partial sums SUM-allreduced with the step's loss; update ratios from
per-block partial ‖Δθ‖² and ‖θ‖² sums, reduced after the update.

When every rank runs on one machine (and `--node-shm`, the default), θ and each rank's
gradient live in memory the ranks share (`NodeBuffers`) and MPI carries only the small
control allreduces: after a barrier rank r sums the ranks' gradients over its block
itself, g_r = Σ_k g_k[lo:hi], reading them where backward wrote them and taking the
block's health in the same pass (`metrics.health.sum_health`), and updates
θ[lo:hi] in place where every rank reads it — no Reduce_scatter copies, no Allgather.
The allreduce of the update's partial sums, which every rank runs after its update, is
the fence before the next forward reads θ; the control allreduce, which every rank
runs after its reads of the gradients, is the fence before the next backward writes
them.
"""

from __future__ import annotations

import numpy as np

from ..comm import shard_counts
from ..metrics.health import grad_health, health_from_sums, sum_health
from ..nn.params import Storage
from ..optim import UpdateRule


class Shard:
    """Rank `rank`'s block [lo, hi) of a flat buffer of `n` elements over `world` ranks."""

    def __init__(self, n: int, rank: int, world: int, layer_slices: dict[str, slice]):
        self.n, self.rank, self.world = n, rank, world
        self.counts = shard_counts(n, world)
        self.lo = int(self.counts[:rank].sum())
        self.hi = self.lo + int(self.counts[rank])
        # Each layer's part inside the block, relative to lo (empty where it lies outside).
        self.layer_slices = {
            name: slice(min(max(sl.start, self.lo), self.hi) - self.lo,
                        max(min(sl.stop, self.hi), self.lo) - self.lo)
            for name, sl in layer_slices.items()}

    @property
    def size(self) -> int:
        return self.hi - self.lo


class NodeBuffers:
    """θ and every rank's gradient in one mapping all ranks of one machine share
    (`comm.shm.map_shared`): [θ | g_0 | … | g_{N−1}], each (P,), page-aligned.

    Rank r's model is built on (θ, g_r) (`storage`): backward writes g_r, the sharded
    update writes θ[lo:hi], and every rank reads all of θ and all the g_k — except
    g_r[lo:hi], which only rank r reads, and where it writes its block's sum Σ_k g_k[lo:hi]
    after the barrier (no other buffer for the update to stream from)."""

    PAGE = 4096

    def __init__(self, mm, n: int, world: int, dtype):
        self._mm = mm
        self.nbytes = len(mm)
        dt = np.dtype(dtype)
        stride = self.stride(n, dt)
        self.params = np.frombuffer(mm, dt, n, 0)
        self.grads = [np.frombuffer(mm, dt, n, (1 + k) * stride) for k in range(world)]

    @classmethod
    def stride(cls, n: int, dtype) -> int:
        return -(-n * np.dtype(dtype).itemsize // cls.PAGE) * cls.PAGE

    @classmethod
    def open(cls, comm, n: int, dtype) -> NodeBuffers | None:
        """Collective: the buffers when every rank is on this machine and can map them,
        else None on every rank."""
        from ..comm.shm import map_shared
        mm = map_shared(comm, (comm.size + 1) * cls.stride(n, dtype))
        return None if mm is None else cls(mm, n, comm.size, dtype)

    def storage(self, rank: int) -> Storage:
        """Where rank `rank`'s model keeps its flat arrays: θ and g_rank."""
        def arrays(n: int, dtype) -> tuple[np.ndarray, np.ndarray]:
            return self.params, self.grads[rank]
        return arrays

class ShardedGradient:
    """Reduce-scatter of the flat gradient, and its health from partial sums."""

    def __init__(self, shard: Shard, dtype):
        self.shard = shard
        self.node: NodeBuffers | None = None  # set when the ranks share θ and gradients
        self.grads = np.zeros(shard.size, dtype=dtype)
        L = len(shard.layer_slices)
        self.L = L
        # [Σ loss, Σ flags, Σg² per layer, non-finite per layer, extra…, Σ stop requests]
        self.ctrl = np.zeros(3 + 2 * L)
        self.stop = False  # after reduce_: some rank asked the chunk to stop
        self.max_abs = np.zeros(1)

    def reduce_(self, comm, full_grads: np.ndarray, local_loss: float, bad_loss: bool,
                extra: np.ndarray | None = None, stop: bool = False
                ) -> tuple[float, dict, bool]:
        """(global loss, health of the whole reduced gradient, skip) — every rank alike.

        `extra` (e.g. an RNN's per-time Σ‖∂L/∂h_t‖²) is SUM-reduced in place in the same
        control allreduce, and so is this rank's `stop` request: `self.stop` is then
        whether any rank asked to stop."""
        if self.node is not None and comm.size > 1:  # full_grads is g_rank, shared
            comm.barrier()  # every rank's backward has written its gradient
            # g_r = Σ_k g_k[lo:hi] in rank order (the same sum on every run), its health in
            # the same pass (0.62 → 0.34 ms per step for the reference MLP's half block),
            # written over this rank's own g_rank[lo:hi], which no other rank reads: no
            # separate (hi − lo,) buffer for the update to stream from (see `NodeBuffers`)
            self.grads = full_grads[self.shard.lo:self.shard.hi]
            h = sum_health(self.node.grads, self.shard.lo, self.grads, self.shard.layer_slices)
        else:
            if comm.size == 1:  # one rank: its gradient is the sum, taken where backward
                self.grads = full_grads  # wrote it (a copy here cost ~1–1.5 ms per step)
            else:
                comm.reduce_scatter_(full_grads, self.grads, self.shard.counts)
            h = grad_health(self.grads, self.shard.layer_slices)
        L = self.L
        n_extra = 0 if extra is None else extra.size
        if self.ctrl.size != 3 + 2 * L + n_extra:
            self.ctrl = np.zeros(3 + 2 * L + n_extra)
        c = self.ctrl
        c[0] = local_loss
        c[1] = 1.0 if bad_loss else 0.0
        c[2:2 + L] = np.square(h["grad_norm"])
        c[2 + L:2 + 2 * L] = h["nonfinite_per_layer"]
        if extra is not None:
            c[2 + 2 * L:-1] = extra
        c[-1] = 1.0 if stop else 0.0
        comm.allreduce_(c)
        if extra is not None:
            extra[...] = c[2 + 2 * L:-1]
        self.stop = bool(c[-1] > 0)
        m = h["grad_max_abs"]
        self.max_abs[0] = -np.inf if m != m else m  # a block with no finite entry: no vote
        comm.allreduce_(self.max_abs, op="max")
        health = health_from_sums(c[2:2 + L], float(self.max_abs[0]), c[2 + L:2 + 2 * L])
        skip = c[1] > 0 or health["nonfinite"] > 0 or not np.isfinite(health["grad_global_norm"])
        return float(c[0]), health, bool(skip)


class ShardedRule:
    """The coordinator's `UpdateRule` on this rank's block, then the Allgather of θ."""

    def __init__(self, rule: UpdateRule, shard: Shard, comm_of):
        self.rule, self.shard, self.comm_of = rule, shard, comm_of
        self.shared = False  # θ in `NodeBuffers`: every rank already sees the others' blocks
        L = len(rule.segments)
        self._sums = np.zeros(2 * L)  # [‖Δθ‖² per layer, ‖θ‖² per layer], partial then total

    def lr(self, step: int) -> float:
        return self.rule.lr(step)

    def step_(self, params: np.ndarray, grads: np.ndarray, step: int, gnorm: float) -> float:
        """θ[lo:hi] ← rule(θ[lo:hi], g_r) then θ ← Allgather (unless θ is shared); `grads`
        is this rank's block. Ends with an allreduce: the fence before θ is read again."""
        lr = self.rule.step_(params, grads, step, gnorm)
        comm = self.comm_of()
        if not self.shared:
            comm.allgather_(params, self.shard.counts)
        L = len(self.rule.segments)
        self._sums[:L] = self.rule.update_sq
        self._sums[L:] = self.rule.param_sq
        comm.allreduce_(self._sums)
        return lr

    def update_ratios(self) -> np.ndarray:
        L = len(self.rule.segments)
        return UpdateRule.ratios(self._sums[:L], self._sums[L:])

    # the state: this rank holds its block of every elementwise array ----------------
    def state_views(self) -> dict[str, np.ndarray]:
        return self.rule.state_views()

    def load_full_(self, state: dict[str, np.ndarray]) -> None:
        """Take this rank's block of a whole (unsharded) state: any worker count can resume."""
        lo, hi = self.shard.lo, self.shard.hi
        self.rule.load_state_({k: (v[lo:hi] if self.elementwise(k) else v)
                               for k, v in state.items() if k.startswith(UpdateRule.STATE_PREFIX)})

    def elementwise(self, key: str) -> bool:
        """Is state array `key` one value per parameter (so split into blocks)?"""
        return self.rule.state_views()[key].shape == (self.shard.size,) and \
            key != UpdateRule.STATE_PREFIX + "t"

    def gather_full(self, comm, into: dict[str, np.ndarray] | None = None
                    ) -> dict[str, np.ndarray] | None:
        """The whole optimizer state on rank 0 (collective; None on other ranks); rank 0
        gathers each per-parameter array straight into `into[key]` (P,) when given."""
        out: dict[str, np.ndarray] = {}
        for k, v in self.rule.state_views().items():
            if not self.elementwise(k):
                out[k] = v.copy()
                continue
            full = None
            if comm.rank == 0:
                full = into[k] if into is not None else np.empty(self.shard.n, v.dtype)
            comm.gather_(v, full, self.shard.counts)
            out[k] = full
        return out if comm.rank == 0 else None

    def state_bytes(self) -> int:
        return self.rule.state_bytes()


__all__ = ["NodeBuffers", "Shard", "ShardedGradient", "ShardedRule"]
