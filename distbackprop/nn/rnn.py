"""A recurrent network trained by backpropagation through time (full or truncated to k steps).

    h_t = tanh(W_x x_t + W_h h_{t−1} + b),   ŷ_t = W_o h_t + b_o,   t = 1 … T

Backward (BPTT), with δh_t = ∂L/∂h_t and δa_t = ∂L/∂(pre-activation at t):
    δh_t = W_oᵀ ∂L/∂ŷ_t + W_hᵀ δa_{t+1},   δa_t = δh_t ⊙ (1 − h_t²),
    dW_x = Σ_t δa_t x_tᵀ,  dW_h = Σ_t δa_t h_{t−1}ᵀ,  db = Σ_t δa_t
Truncated to k: the graph is cut every k steps — h_{jk} enters step jk+1 as a constant, i.e.
the term W_hᵀ δa_{jk+1} is dropped from δh_{jk}. That equals the exact gradient of the same
loss computed chunk by chunk from carried-forward, non-differentiated states.

All parameters live in one `ParamBuffer` (names ``rnn.W_x, rnn.W_h, rnn.b, readout.W,
readout.b``); layer names for metrics are ``rnn`` and ``readout``. Batch-first at the API
(``x: (batch, T, n_in)``), time-major inside, so each step is a contiguous (batch, ·) slab.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .layers import Dense
from .losses import loss_and_grad as _loss_and_grad
from .params import FlatModel, ParamBuffer, Storage


class RNN(FlatModel):
    """Elman RNN (tanh) with a linear readout at every step, over one flat `ParamBuffer`.

    After each backward, `time_grad_norms` (T,) holds ‖∂L/∂h_t‖ (Frobenius over the batch)
    for t = 1 … T, so vanishing (or exploding) gradients over time are visible;
    `bucket_time_norms` folds it into a few labelled buckets for metrics.
    """

    def __init__(self, n_in: int, n_hidden: int, n_out: int, dtype=np.float64,
                 seed: int | None = 0, rng: np.random.Generator | None = None,
                 recurrent_gain: float = 0.9, storage: Storage | None = None):
        for name, v in (("n_in", n_in), ("n_hidden", n_hidden), ("n_out", n_out)):
            if int(v) <= 0:
                raise ValueError(f"{name}: must be > 0, got {v}")
        self.n_in, self.n_hidden, self.n_out = int(n_in), int(n_hidden), int(n_out)
        H = self.n_hidden
        self.buffer = ParamBuffer([("rnn.W_x", (H, self.n_in)), ("rnn.W_h", (H, H)),
                                   ("rnn.b", (H,)), ("readout.W", (self.n_out, H)),
                                   ("readout.b", (self.n_out,))], dtype=dtype,
                                  storage=storage)
        b = self.buffer
        self.W_x, self.W_h, self.b = b.param("rnn.W_x"), b.param("rnn.W_h"), b.param("rnn.b")
        self.dW_x, self.dW_h, self.db = b.grad("rnn.W_x"), b.grad("rnn.W_h"), b.grad("rnn.b")
        self.readout = Dense("readout", b.param("readout.W"), b.param("readout.b"),
                             b.grad("readout.W"), b.grad("readout.b"))
        rng = rng or np.random.default_rng(seed)
        # Glorot for the input and readout maps; an orthogonal recurrent matrix times a gain
        # < 1 keeps ‖W_h‖₂ = gain, so the state neither blows up nor dies at initialisation.
        self.W_x[...] = rng.standard_normal(self.W_x.shape) * math.sqrt(2.0 / (self.n_in + H))
        q, r = np.linalg.qr(rng.standard_normal((H, H)))
        self.W_h[...] = recurrent_gain * q * np.sign(np.diag(r))
        self.readout.W[...] = (rng.standard_normal(self.readout.W.shape)
                               * math.sqrt(2.0 / (H + self.n_out)))
        self._X: np.ndarray | None = None   # (T, batch, n_in)
        self._H: np.ndarray | None = None   # (T+1, batch, hidden), H[0] = h0
        self.time_grad_norms = np.zeros(0)

    def layer_params(self) -> dict[str, list[str]]:
        return {"rnn": ["rnn.W_x", "rnn.W_h", "rnn.b"], "readout": ["readout.W", "readout.b"]}

    # the passes ----------------------------------------------------------------------
    def forward(self, x: np.ndarray, h0: np.ndarray | None = None) -> np.ndarray:
        """x: (batch, T, n_in) → ŷ: (batch, T, n_out) (a view); caches x and h_0 … h_T.

        h0: (batch, hidden), zeros by default. `final_state` is h_T afterwards (a copy).
        """
        x = np.asarray(x, dtype=self.dtype)
        if x.ndim != 3 or x.shape[2] != self.n_in:
            raise ValueError(f"RNN.forward: x must be (batch, T, {self.n_in}), got {x.shape}")
        B, T, _ = x.shape
        X = np.ascontiguousarray(x.transpose(1, 0, 2))
        Hs = np.empty((T + 1, B, self.n_hidden), dtype=self.dtype)
        Hs[0] = 0.0 if h0 is None else h0
        # The input projections of all steps in one GEMM: A_t = x_t W_xᵀ + b.
        A = (X.reshape(T * B, self.n_in) @ self.W_x.T).reshape(T, B, self.n_hidden)
        A += self.b
        for t in range(T):
            h = Hs[t + 1]
            np.matmul(Hs[t], self.W_h.T, out=h)
            h += A[t]
            np.tanh(h, out=h)
        self._X, self._H = X, Hs
        self.final_state = Hs[T].copy()
        Y = self.readout.forward(Hs[1:].reshape(T * B, self.n_hidden))
        return Y.reshape(T, B, self.n_out).transpose(1, 0, 2)

    def backward(self, dy: np.ndarray, truncate: int | None = None) -> np.ndarray:
        """dy = ∂L/∂ŷ: (batch, T, n_out). Fills `grads` (overwrites); returns ∂L/∂h0 (batch, H).

        `truncate=k` cuts the graph every k steps (see the module docstring); None = full BPTT.
        """
        if self._H is None:
            raise RuntimeError("RNN: backward without a forward")
        if truncate is not None and int(truncate) < 1:
            raise ValueError(f"truncate: must be ≥ 1 step, got {truncate}")
        X, Hs = self._X, self._H
        T, B, H = X.shape[0], X.shape[1], self.n_hidden
        dY = np.ascontiguousarray(np.asarray(dy, dtype=self.dtype).transpose(1, 0, 2))
        dH = self.readout.backward(dY.reshape(T * B, self.n_out)).reshape(T, B, H).copy()
        dA = np.empty_like(dH)
        carry = np.zeros((B, H), dtype=self.dtype)
        norms = np.empty(T)
        for t in range(T - 1, -1, -1):       # step t+1 (1-based): Hs[t] → Hs[t+1]
            dh = dH[t]
            dh += carry
            norms[t] = math.sqrt(float(np.vdot(dh, dh)))
            h = Hs[t + 1]
            da = dA[t]
            np.multiply(h, h, out=da)
            np.subtract(1.0, da, out=da)
            da *= dh
            if truncate is not None and t % int(truncate) == 0:
                carry.fill(0.0)              # h_t entered this chunk as a constant
            else:
                np.matmul(da, self.W_h, out=carry)
        dA2 = dA.reshape(T * B, H)
        np.matmul(dA2.T, X.reshape(T * B, self.n_in), out=self.dW_x)
        np.matmul(dA2.T, Hs[:-1].reshape(T * B, H), out=self.dW_h)
        np.sum(dA2, axis=0, out=self.db)
        self.time_grad_norms = norms
        self._X = self._H = None
        return carry

    def loss_and_grad(self, x: np.ndarray, y: np.ndarray, loss: str = "mse",
                      denom: float | None = None, truncate: int | None = None,
                      last_only: bool = False, h0: np.ndarray | None = None) -> float:
        """Forward, loss, BPTT. Returns Σ ℓ / denom and fills `grads` with its gradient.

        Every step (default): y is (batch, T, n_out) — (batch, T) of ints for cross_entropy —
        and ℓ is summed over rows and steps, denom defaults to batch·T.
        `last_only`: only ŷ_T is scored, y is (batch, n_out) / (batch,), denom defaults to batch.
        Data-parallel workers pass the global denominator so a SUM-allreduce gives the mean.
        """
        y_hat = self.forward(x, h0)
        B, T = y_hat.shape[0], y_hat.shape[1]
        dy = np.zeros((T, B, self.n_out), dtype=self.dtype)
        Y = y_hat.transpose(1, 0, 2)        # time-major view of the readout's workspace
        if last_only:
            d = float(denom if denom is not None else max(B, 1))
            value = _loss_and_grad(loss, np.ascontiguousarray(Y[-1]), np.asarray(y), d, dy[-1])
        else:
            d = float(denom if denom is not None else max(B * T, 1))
            y = np.asarray(y)
            y_tm = np.ascontiguousarray(np.swapaxes(y, 0, 1))
            rows = y_tm.reshape(T * B, -1) if y_tm.ndim == 3 else y_tm.reshape(T * B)
            value = _loss_and_grad(loss, Y.reshape(T * B, self.n_out), rows, d,
                                   dy.reshape(T * B, self.n_out))
        self.backward(dy.transpose(1, 0, 2), truncate=truncate)
        return value

    def activation_bytes(self) -> int:
        """Exact bytes held for backward: x (time-major copy), h_0 … h_T, and the readout's input
        (a view of h, so not counted twice). 0 after backward."""
        return sum(a.nbytes for a in (self._X, self._H) if a is not None)


    def release_(self) -> None:
        self._X = self._H = None
        self.readout.release_()


SEQUENCE_TARGETS = ("last", "every")
TIME_BUCKETS = 4  # time buckets reported per step: few, so metric labels stay few


class SequenceRNN(RNN):
    """The RNN as a flat-row model — what the runtime, ``model.npz``, evaluate and predict use.

    A row ``x (n_steps·n_in,)`` is a sequence stored step-major (x[t·F + f] = x_t[f], the
    row-major flattening of a ``fixed_size_list<fixed_size_list<float, F>, T>`` cell), so
    ``x (batch, T·F)`` is viewed, without a copy, as ``(batch, T, F)``.

    ``sequence_target="last"``: ŷ = W_o h_T + b_o, shape (batch, n_out) — classification or
    regression of the whole sequence; ∂L/∂ŷ_t = 0 for t < T.
    ``"every"``: ŷ (batch, T·n_out), ŷ[:, t·k + j] = (W_o h_t + b_o)_j — a forecast per step,
    the loss summed over steps (Σ_rows Σ_t ℓ / denom).
    ``truncate=k``: BPTT cut every k steps (see the module docstring); None = full BPTT.
    The cell is tanh; `time_sq` (T,) holds Σ_rows ‖∂L/∂h_t‖² of the last backward.
    """

    def __init__(self, n_in: int, n_hidden: int, n_out: int, n_steps: int,
                 sequence_target: str = "last", truncate: int | None = None, dtype=np.float64,
                 seed: int | None = 0, recurrent_gain: float = 0.9,
                 storage: Storage | None = None):
        if sequence_target not in SEQUENCE_TARGETS:
            raise ValueError(f"sequence_target: {sequence_target!r} is not one of "
                             f"{', '.join(SEQUENCE_TARGETS)}")
        if int(n_steps) <= 0:
            raise ValueError(f"n_steps: must be > 0, got {n_steps}")
        if truncate is not None and int(truncate) < 1:
            raise ValueError(f"truncate: must be ≥ 1 step, got {truncate}")
        super().__init__(n_in, n_hidden, n_out, dtype=dtype, seed=seed,
                         recurrent_gain=recurrent_gain, storage=storage)
        self.n_steps, self.sequence_target = int(n_steps), sequence_target
        self.truncate = None if truncate is None else int(truncate)
        self.recurrent_gain = float(recurrent_gain)
        self.time_buckets = list(bucket_time_norms(np.zeros(self.n_steps), TIME_BUCKETS))
        self.time_sq = np.zeros(self.n_steps)

    @property
    def row_width(self) -> int:
        return self.n_steps * self.n_in

    @property
    def output_width(self) -> int:
        return self.n_out if self.sequence_target == "last" else self.n_steps * self.n_out

    def forward(self, x: np.ndarray, h0: np.ndarray | None = None) -> np.ndarray:
        """x: (batch, T·F) → ŷ: (batch, n_out) [last] or (batch, T·n_out) [every]."""
        x = np.asarray(x, dtype=self.dtype)
        if x.ndim != 2 or x.shape[1] != self.row_width:
            raise ValueError(f"SequenceRNN.forward: x must be (batch, {self.row_width}) = "
                             f"(batch, T={self.n_steps} × F={self.n_in}), got {x.shape}")
        B = x.shape[0]
        y = RNN.forward(self, x.reshape(B, self.n_steps, self.n_in), h0)
        if self.sequence_target == "last":
            return np.ascontiguousarray(y[:, -1, :])
        return y.reshape(B, self.n_steps * self.n_out)

    def backward(self, dy: np.ndarray, on_layer_done=None, truncate: int | None = None
                 ) -> np.ndarray:
        """dy = ∂L/∂ŷ in `forward`'s output shape. Fills `grads` (overwrites) and `time_sq`.

        `on_layer_done(name)` fires per layer once its gradient is final (all at the end:
        BPTT finishes dW_x, dW_h together), for the bucketed allreduce.
        """
        dy = np.asarray(dy, dtype=self.dtype)
        B = dy.shape[0]
        full = np.zeros((B, self.n_steps, self.n_out), dtype=self.dtype)
        if self.sequence_target == "last":
            full[:, -1, :] = dy
        else:
            full[...] = dy.reshape(B, self.n_steps, self.n_out)
        dh0 = RNN.backward(self, full, truncate=self.truncate if truncate is None else truncate)
        np.square(self.time_grad_norms, out=self.time_sq)
        if on_layer_done is not None:
            for name in reversed(self.layer_names):
                on_layer_done(name)
        return dh0

    def loss_and_grad(self, x: np.ndarray, y: np.ndarray, loss: str = "mse",
                      denom: float | None = None, on_layer_done=None,
                      label_smoothing: float = 0.0) -> float:  # type: ignore[override]
        """Forward, loss, BPTT on flat rows. Returns Σ_rows ℓ / denom (denom: batch by default;
        data-parallel workers pass the global batch size); `grads` ← ∂L/∂θ."""
        y_hat = self.forward(x)
        d = float(denom if denom is not None else max(x.shape[0], 1))
        dy = np.empty(y_hat.shape, dtype=self.dtype)
        value = _loss_and_grad(loss, np.ascontiguousarray(y_hat), np.asarray(y), d, dy,
                               label_smoothing)
        self.backward(dy, on_layer_done)
        return value

    def bucket_norms(self, time_sq: np.ndarray | None = None) -> np.ndarray:
        """(len(time_buckets),) RMS of ‖∂L/∂h_t‖ over each bucket's steps, from Σ‖∂L/∂h_t‖²
        (T,) — this model's last backward, or the sum over ranks when given."""
        sq = self.time_sq if time_sq is None else time_sq
        return np.array(list(bucket_time_norms(np.sqrt(sq), TIME_BUCKETS).values()))

    def architecture(self) -> dict[str, Any]:
        return {"kind": "rnn", "n_in": self.n_in, "n_hidden": self.n_hidden,
                "n_out": self.n_out, "n_steps": self.n_steps,
                "sequence_target": self.sequence_target, "truncate": self.truncate,
                "recurrent_gain": self.recurrent_gain, "dtype": self.dtype.name}


def time_ratio(bucket_norms: np.ndarray) -> float:
    """First time bucket / last: ≪ 1 when the gradient reaching early steps has vanished."""
    b = np.asarray(bucket_norms, dtype=np.float64)
    if b.size == 0 or not b[-1] > 0:
        return math.nan
    return float(b[0] / b[-1])


def bucket_time_norms(norms: np.ndarray, buckets: int = 4) -> dict[str, float]:
    """Fold per-step norms (T,) into ≤ `buckets` contiguous spans of steps, labelled by their
    1-based step range ("t1-8", "t9-16", …); each value is the RMS of the norms in its span.

    Few fixed labels per run keep metric label counts small whatever T is.
    """
    norms = np.asarray(norms, dtype=np.float64)
    if buckets < 1:
        raise ValueError(f"buckets: must be ≥ 1, got {buckets}")
    out: dict[str, float] = {}
    lo = 0
    for part in np.array_split(norms, min(buckets, max(norms.size, 1))):
        if part.size == 0:
            continue
        hi = lo + part.size
        out[f"t{lo + 1}-{hi}"] = float(np.sqrt(np.mean(part * part)))
        lo = hi
    return out


def sine_forecast_batch(rng: np.random.Generator, batch: int, steps: int,
                        dt: float = 0.2, freq: tuple[float, float] = (0.5, 1.5),
                        dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Sine sequences with random frequency ω ~ U(freq) and phase φ ~ U(0, 2π):
    x_t = sin(ω t dt + φ), target y_t = x_{t+1} (one-step-ahead forecast).

    Returns x: (batch, steps, 1), y: (batch, steps, 1).
    """
    w = rng.uniform(freq[0], freq[1], (batch, 1))
    phi = rng.uniform(0.0, 2 * np.pi, (batch, 1))
    t = np.arange(steps + 1)[None, :] * dt
    s = np.sin(w * t + phi).astype(dtype)
    return s[:, :-1, None], s[:, 1:, None]

