"""Gradient checkpointing (rematerialisation) for an MLP: keep every k-th block's input,
recompute the rest during backward (Chen et al. 2016, "Training deep nets with sublinear
memory cost").

A block is Dense_j followed by its activation σ_j (the last block has none); blocks are
grouped into segments of `every` blocks. Forward keeps only each segment's input
c_s = h_{s·k} (c_0 = x). Backward walks the segments last to first: from c_s it recomputes
z_j = h_{j−1} W_jᵀ + b_j, h_j = σ_j(z_j) inside the segment, then runs the usual recursion
dz = dh ⊙ σ′, dW = dzᵀ h_prev, db = Σ dz, dh_prev = dz W through it, and frees it.

Held activations: n = ⌈L/k⌉ checkpoints after forward (plain: L layer inputs), at most
n + k − 1 during backward, for one extra forward through L − n blocks (a segment's last
block never needs recomputing: its output is the next checkpoint, and the final layer's
output is consumed by the loss). The arithmetic is the plain path's, operation for
operation, so the gradients are bit-for-bit identical.

The wrapper uses its own grow-only buffers (checkpoints, one segment, two gradient buffers)
and never calls the layers' forward, so the layers' per-layer workspaces are not allocated:
the saving is real memory, not only accounting.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .layers import Activation, Dense
from .model import forward_loss_backward


class CheckpointedMLP:
    """Same model (shares `model`'s `ParamBuffer`), backward by recomputation every `every`
    blocks. Drop-in for `forward` / `backward` / `loss_and_grad` / `activation_bytes`.

    `activation_bytes()` is exactly what is held for backward right now (as
    `MLP.activation_bytes`); `peak_activation_bytes` is its maximum over the last
    forward + backward, including the recomputed segment.
    """

    def __init__(self, model: Any, every: int = 4):
        if int(every) < 1:
            raise ValueError(f"every: must be ≥ 1 block, got {every}")
        self.model = model
        self.every = int(every)
        self.blocks: list[tuple[Dense, Activation | None]] = []
        layers = list(model.layers)
        i = 0
        while i < len(layers):
            d = layers[i]
            if not isinstance(d, Dense):
                raise TypeError(f"CheckpointedMLP: expected Dense at layer {i}, "
                                f"got {type(d).__name__}")
            act = layers[i + 1] if i + 1 < len(layers) else None
            if act is not None and not isinstance(act, Activation):
                raise TypeError(f"CheckpointedMLP: expected an activation at layer {i + 1}, "
                                f"got {type(act).__name__}")
            self.blocks.append((d, act))
            i += 2
        if any(a is None for _, a in self.blocks[:-1]):
            raise TypeError("CheckpointedMLP: only the last Dense may lack an activation")
        self.n_segments = math.ceil(len(self.blocks) / self.every)
        self._bufs: dict[str, np.ndarray] = {}
        self._ckpt: list[np.ndarray | None] = [None] * self.n_segments
        self._live: dict[str, int] = {}
        self.peak_activation_bytes = 0
        self._dy: np.ndarray | None = None

    # the wrapped model's buffers, views and names ------------------------------------
    def __getattr__(self, name: str):
        # params, grads, buffer, dtype, layers, layer_names, layer_slices, named_params,
        # named_grads, zero_grad_ …: the wrapped model's own (shared buffer).
        if name == "model":  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def dense_layers(self) -> list[Dense]:
        return [d for d, _ in self.blocks]

    # buffers and accounting -----------------------------------------------------------
    def _view(self, key: str, rows: int, width: int) -> np.ndarray:
        """C-contiguous (rows, width) view of the grow-only flat buffer `key`."""
        n = rows * width
        buf = self._bufs.get(key)
        if buf is None or buf.size < n:
            buf = self._bufs[key] = np.empty(max(n, 1), dtype=self.dtype)
        return buf[:n].reshape(rows, width)

    def _hold(self, key: str, a: np.ndarray) -> None:
        self._live[key] = a.nbytes
        self.peak_activation_bytes = max(self.peak_activation_bytes, self.activation_bytes())

    def _drop(self, key: str) -> None:
        self._live.pop(key, None)

    def activation_bytes(self) -> int:
        """Exact bytes held for backward now: live checkpoints + the recomputed segment."""
        return sum(self._live.values())

    def workspace_bytes(self) -> int:
        """Bytes of every buffer this wrapper has allocated (checkpoints, scratch, gradients)."""
        return sum(b.nbytes for b in self._bufs.values())

    # the passes -------------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        """x: (batch, n_in) → ŷ: (batch, n_out) (a scratch view); keeps segment inputs only."""
        h = np.asarray(x, dtype=self.dtype)
        rows = h.shape[0]
        self._live.clear()
        self.peak_activation_bytes = 0
        self._ckpt = [None] * self.n_segments
        self._ckpt[0] = h
        self._hold("ckpt0", h)
        key = ""
        for j, (dense, act) in enumerate(self.blocks):
            z = self._view("fz", rows, dense.out_features)
            np.matmul(h, dense.W.T, out=z)
            z += dense.b
            if act is None:
                h = z
                break
            if (j + 1) % self.every == 0:
                s = (j + 1) // self.every
                key = f"ckpt{s}"
                out = self._view(key, rows, dense.out_features)
                self._ckpt[s] = out
                self._hold(key, out)
            else:
                key = "fp1" if key == "fp0" else "fp0"
                out = self._view(key, rows, dense.out_features)
            act.apply_(z, out)
            h = out
        self._rows = rows
        return h

    def backward(self, dy: np.ndarray, on_layer_done=None) -> None:
        """dy = ∂L/∂ŷ: (batch, n_out). Fills `grads` (overwrites), last layer first.

        `on_layer_done(name)` fires as soon as a Dense layer's dW and db are written.
        """
        if self._ckpt[0] is None:
            raise RuntimeError("CheckpointedMLP: backward without a forward")
        rows = self._rows
        g, gkey = dy, ""
        for s in range(self.n_segments - 1, -1, -1):
            j0 = s * self.every
            j1 = min(j0 + self.every, len(self.blocks))
            ins: dict[int, np.ndarray] = {j0: self._ckpt[s]}
            cache: dict[int, np.ndarray] = {}
            h = self._ckpt[s]
            for j in range(j0, j1):           # recompute the segment
                dense, act = self.blocks[j]
                if act is None:
                    break
                last = j == j1 - 1
                if last and act.uses_output:
                    cache[j] = self._ckpt[s + 1]   # σ(z) of the last block is c_{s+1}
                    break
                zkey = f"sz{j - j0}" if not act.uses_output else "rz"
                z = self._view(zkey, rows, dense.out_features)
                np.matmul(h, dense.W.T, out=z)
                z += dense.b
                if not act.uses_output:
                    cache[j] = z
                    self._hold(zkey, z)
                if last:
                    break
                hkey = f"sh{j - j0}"
                hn = self._view(hkey, rows, dense.out_features)
                act.apply_(z, hn)
                self._hold(hkey, hn)
                if act.uses_output:
                    cache[j] = hn
                ins[j + 1] = hn
                h = hn
            for j in range(j1 - 1, j0 - 1, -1):   # backward through it
                dense, act = self.blocks[j]
                if act is not None:
                    gkey = "gb" if gkey == "ga" else "ga"
                    dz = self._view(gkey, rows, dense.out_features)
                    act.grad_(cache[j], g, dz)
                    g = dz
                    self._drop(f"sz{j - j0}")
                np.matmul(g.T, ins[j], out=dense.dW)
                np.sum(g, axis=0, out=dense.db)
                if j > 0:
                    gkey = "gb" if gkey == "ga" else "ga"
                    dx = self._view(gkey, rows, dense.in_features)
                    np.matmul(g, dense.W, out=dx)
                    g = dx
                if j > j0:
                    self._drop(f"sh{j - 1 - j0}")
                if on_layer_done is not None:
                    on_layer_done(dense.name)
            if s + 1 < self.n_segments:
                self._drop(f"ckpt{s + 1}")
                self._ckpt[s + 1] = None
        self._drop("ckpt0")
        self._ckpt[0] = None

    def loss_and_grad(self, x: np.ndarray, y: np.ndarray, loss: str = "cross_entropy",
                      denom: float | None = None, on_layer_done=None,
                      label_smoothing: float = 0.0) -> float:
        """Forward, loss, backward (as `Sequential.loss_and_grad`): Σ_rows ℓ / denom."""
        return forward_loss_backward(self, x, y, loss, denom, on_layer_done, label_smoothing)

    def release_(self) -> None:
        """Drop the checkpoints without a backward."""
        self._ckpt = [None] * self.n_segments
        self._live.clear()


def plain_workspace_bytes(model: Any) -> int:
    """Bytes of the per-layer workspaces a plain `Sequential` has allocated (for comparison
    with `CheckpointedMLP.workspace_bytes`)."""
    return sum(layer.workspace_bytes() for layer in model.layers)
