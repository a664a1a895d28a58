"""`MLP`: Dense → activation → … → Dense over one `ParamBuffer`.

Forward caches z and h per layer; backward runs the seed's recursion,
batched: dz = dh ⊙ σ′(z); dW = dzᵀ h_prev; db = Σ_batch dz; dh_prev = dz W.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .layers import Dense, Layer, make_activation
from .losses import loss_and_grad as _loss_and_grad
from .params import FlatModel, ParamBuffer, Storage
from .rnn import SequenceRNN

INITS = ("he", "xavier", "normal")


def loss_grad_buffer(holder: Any, y_hat: np.ndarray) -> np.ndarray:
    """A (batch, n_out) view for ∂L/∂ŷ, kept on `holder._dy` and grown only when needed."""
    buf = getattr(holder, "_dy", None)
    if buf is None or buf.shape[0] < y_hat.shape[0] or buf.shape[1] != y_hat.shape[1]:
        buf = np.empty((max(y_hat.shape[0], 1), y_hat.shape[1]), dtype=y_hat.dtype)
        holder._dy = buf
    return buf[: y_hat.shape[0]]


def forward_loss_backward(net: Any, x: np.ndarray, y: np.ndarray, loss: str,
                          denom: float | None, on_layer_done=None,
                          label_smoothing: float = 0.0) -> float:
    """ŷ = net.forward(x); L = Σ_rows ℓ(ŷ, y)/denom; net.backward(∂L/∂ŷ). Returns L.

    denom defaults to the batch size (batch mean); `label_smoothing` as in
    `losses.loss_and_grad` (cross_entropy only).
    """
    y_hat = net.forward(x)
    d = float(denom if denom is not None else max(x.shape[0], 1))
    dy = loss_grad_buffer(net, y_hat)
    value = _loss_and_grad(loss, y_hat, y, d, dy, label_smoothing)
    net.backward(dy, on_layer_done=on_layer_done)
    return value


def init_params_(model: MLP, init: str, rng: np.random.Generator, scale: float = 1.0) -> None:
    """Fill weights in place from `rng`; biases are zero.

    he: N(0, 2/in) · xavier (Glorot normal): N(0, 2/(in+out)) · normal: N(0, 0.01²).
    Draws float64 then casts, so float32 and float64 models start from the same numbers.
    """
    if init not in INITS:
        raise ValueError(f"init: {init!r} is not one of {', '.join(INITS)}")
    for d in model.dense_layers:
        fan_out, fan_in = d.W.shape
        std = {"he": np.sqrt(2.0 / fan_in), "xavier": np.sqrt(2.0 / (fan_in + fan_out)),
               "normal": 0.01}[init]
        d.W[...] = rng.standard_normal(d.W.shape) * (std * scale)
        d.b[...] = 0


class Sequential(FlatModel):
    """Layers applied in order over one `ParamBuffer` (its `params`/`grads` are the model's)."""

    def __init__(self, layers: Sequence[Layer], buffer: ParamBuffer):
        self.layers = list(layers)
        self.buffer = buffer
        self.dense_layers = [lay for lay in self.layers if isinstance(lay, Dense)]
        self._dy: np.ndarray | None = None

    def layer_params(self) -> dict[str, list[str]]:
        return {d.name: [f"{d.name}.W", f"{d.name}.b"] for d in self.dense_layers}

    # the passes ---------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        """x: (batch, n_in) → ŷ: (batch, n_out); caches what backward needs.

        The returned array is a workspace view, overwritten by the next forward.
        """
        h = np.asarray(x, dtype=self.dtype)
        for layer in self.layers:
            h = layer.forward(h)
        return h

    def backward(self, dy: np.ndarray, on_layer_done=None) -> None:
        """dy = ∂L/∂ŷ: (batch, n_out). Fills `grads` (overwrites), last layer first.

        `on_layer_done(name)` is called as soon as a Dense layer's dW and db are
        written (the hook the bucketed allreduce overlaps with).
        """
        first = self.layers[0]
        for layer in reversed(self.layers):
            dy = layer.backward(dy, need_dx=layer is not first)
            if on_layer_done is not None and isinstance(layer, Dense):
                on_layer_done(layer.name)

    def loss_and_grad(self, x: np.ndarray, y: np.ndarray, loss: str = "cross_entropy",
                      denom: float | None = None, on_layer_done=None,
                      label_smoothing: float = 0.0) -> float:
        """Forward, loss, backward. Returns Σ_rows ℓ / denom; `grads` ← ∂L/∂θ.

        x: (batch, n_in); y: (batch,) labels or (batch, n_out) targets. denom defaults
        to the batch size (batch mean); data-parallel workers pass the global batch size
        so a SUM-allreduce yields the global mean. `label_smoothing` ε (cross_entropy
        only): targets (1 − ε)·onehot + ε/C.
        """
        return forward_loss_backward(self, x, y, loss, denom, on_layer_done, label_smoothing)

    def activation_bytes(self) -> int:
        """Exact bytes of the arrays currently cached for backward (0 after backward)."""
        seen: dict[int, int] = {}
        for layer in self.layers:
            for a in layer.cached():
                seen[id(a)] = a.nbytes
        return sum(seen.values())

    def release_(self) -> None:
        """Drop every cache forward kept (inference needs no backward)."""
        for layer in self.layers:
            layer.release_()


class MLP(Sequential):
    """Multi-layer perceptron: sizes [n_in, h1, …, n_out]; `activation` between Dense layers.

    Layers are named dense0, dense1, …; the output layer has no activation
    (the loss takes logits or raw values).
    """

    def __init__(self, sizes: Sequence[int], activation: str = "relu", dtype=np.float64,
                 seed: int | None = 0, init: str | None = None, init_scale: float = 1.0,
                 rng: np.random.Generator | None = None, quantize_bits: int | None = None,
                 storage: Storage | None = None):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or any(s <= 0 for s in sizes):
            raise ValueError(f"sizes: need at least [n_in, n_out], all > 0, got {sizes}")
        self.sizes = sizes
        self.activation = activation
        self.quantize_bits = quantize_bits
        make_activation(activation, quantize_bits=quantize_bits)  # fail before allocating
        self.init = init or ("he" if activation in ("relu", "leaky_relu", "gelu", "softplus")
                             else "xavier")
        shapes = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            shapes += [(f"dense{i}.W", (n_out, n_in)), (f"dense{i}.b", (n_out,))]
        buf = ParamBuffer(shapes, dtype=dtype, storage=storage)
        layers: list[Layer] = []
        n_dense = len(sizes) - 1
        for i in range(n_dense):
            name = f"dense{i}"
            layers.append(Dense(name, buf.param(f"{name}.W"), buf.param(f"{name}.b"),
                                buf.grad(f"{name}.W"), buf.grad(f"{name}.b")))
            if i < n_dense - 1:
                layers.append(make_activation(activation, f"act{i}", dtype, quantize_bits))
        super().__init__(layers, buf)
        init_params_(self, self.init, rng or np.random.default_rng(seed), init_scale)

    @property
    def n_in(self) -> int:
        return self.sizes[0]

    @property
    def n_out(self) -> int:
        return self.sizes[-1]

    @property
    def output_width(self) -> int:
        return self.n_out

    def architecture(self) -> dict[str, Any]:
        return {"sizes": self.sizes, "activation": self.activation, "init": self.init,
                "dtype": self.dtype.name, "quantize_bits": self.quantize_bits}


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every member of the .npz at `path`, never unpickling; anything else → InputError."""
    def bad(what: str) -> InputError:
        return InputError(f"{path}: {what}")

    if not path.is_file():
        raise bad("file not found" if not path.exists() else "not a regular file")
    # np.load sniffs the magic bytes itself and, failing that, tries to unpickle the whole
    # file (refused here); insisting on a zip first gives an exact message.
    if not zipfile.is_zipfile(path):
        raise bad("not an .npz (zip) archive, or truncated (no zip directory at its end)")
    data: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for name in z.files:
                try:
                    data[name] = z[name]
                except ValueError as exc:
                    if "allow_pickle" in str(exc) or "pickle" in str(exc):
                        raise bad(f"member {name!r} is a pickled object array; refused") from None
                    raise bad(f"member {name!r} is not a NumPy array ({exc})") from None
    except InputError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise bad(f"truncated or corrupt archive ({type(exc).__name__}: {exc})") from None
    return data


def _architecture(path: Path, data: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict]:
    """(architecture, header) from the `header_json` member, every field checked."""
    def bad(what: str) -> InputError:
        return InputError(f"{path}: {what}")

    missing = [k for k in ("header_json", "params") if k not in data]
    if missing:
        raise bad(f"not a distbackprop model: missing member(s) {', '.join(missing)}")
    raw = data["header_json"]
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise bad(f"header_json must be 1-D uint8 bytes, got {raw.dtype} {raw.shape}")
    try:
        header = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"header_json is not JSON ({exc})") from None
    arch = header.get("architecture") if isinstance(header, dict) else None
    if not isinstance(arch, dict):
        raise bad("header_json has no 'architecture' mapping")
    rnn = arch.get("kind") == "rnn"
    keys = ("n_in", "n_hidden", "n_out", "n_steps", "dtype") if rnn else \
        ("sizes", "activation", "dtype")
    problems = [f"architecture has no {k!r}" for k in keys if k not in arch]
    if problems:
        raise bad("; ".join(problems))
    sizes = [arch[k] for k in keys[:4]] if rnn else arch["sizes"]
    if (not isinstance(sizes, list) or len(sizes) < 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)):
        what = "n_in, n_hidden, n_out, n_steps" if rnn else "sizes"
        raise bad(f"architecture {what} must be positive integers, got {sizes!r}")
    if arch["dtype"] not in ("float32", "float64"):
        raise bad(f"architecture dtype must be float32 or float64, got {arch['dtype']!r}")
    if not isinstance(header.get("meta", {}), dict):
        raise bad("header_json 'meta' is not a mapping")
    return arch, header


def _build(arch: dict[str, Any]) -> FlatModel:
    """The model an architecture mapping describes (``kind`` "rnn", else an MLP), seed 0."""
    dtype = np.dtype(arch["dtype"])
    if arch.get("kind") == "rnn":
        return SequenceRNN(arch["n_in"], arch["n_hidden"], arch["n_out"], arch["n_steps"],
                           sequence_target=arch.get("sequence_target", "last"),
                           truncate=arch.get("truncate"), dtype=dtype, seed=0,
                           recurrent_gain=float(arch.get("recurrent_gain", 0.9)))
    return MLP(arch["sizes"], activation=arch["activation"], dtype=dtype,
               init=arch.get("init"), seed=0, quantize_bits=arch.get("quantize_bits"))


def load_model(path: str | os.PathLike) -> FlatModel:
    """Load a model saved by `FlatModel.save` — an `MLP` or a `SequenceRNN`
    (``allow_pickle=False``; anything else is refused).

    Any file that is not what it claims — not a zip, truncated, missing members, a header
    that is not the expected JSON, an unknown activation, params of the wrong shape or
    dtype for the architecture, pickled object arrays — raises `InputError` naming the
    file and the fault. The returned model carries `.meta` (dict) and `.extra` (dict of
    arrays).
    """
    path = Path(path)
    data = _read_npz(path)
    arch, header = _architecture(path, data)
    try:
        model = _build(arch)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: architecture: {exc}") from None
    params = data["params"]
    if params.dtype != model.params.dtype:
        raise InputError(f"{path}: params are {params.dtype}, architecture says "
                         f"{model.params.dtype}")
    if params.shape != model.params.shape:
        raise InputError(f"{path}: params has shape {params.shape}, architecture "
                         f"{arch.get('sizes', arch)} needs ({model.params.size},)")
    model.params[...] = params
    model.meta = dict(header.get("meta", {}))
    model.meta.update({k[len("meta/"):]: v for k, v in data.items() if k.startswith("meta/")})
    model.extra = {k[len("extra/"):]: v for k, v in data.items() if k.startswith("extra/")}
    return model
