"""Which flat-buffer model a run trains (``--model mlp|rnn``), and what the data must hold
for it. The runtime only ever uses the `FlatModel` protocol of what `build_model` returns.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import TrainConfig
from ..nn import MLP
from ..nn.params import FlatModel, Storage
from ..nn.rnn import SequenceRNN


def build_model(config: TrainConfig, n_in: int, n_out: int,
                sequence: tuple[int, int] | None = None,
                storage: Storage | None = None) -> FlatModel:
    """The configured model, initialised from `config.seed` (identical on every replica);
    its flat params and grads in `storage`'s arrays when given (see `ParamBuffer`).

    ``mlp``: sizes [n_in, *hidden, n_out]. ``rnn``: a tanh `SequenceRNN` of state size
    hidden[0] over rows of ``sequence`` = (T, F) with ``n_in = T·F``.
    """
    c = config
    if c.model == "rnn":
        if sequence is None:
            raise ValueError("model rnn: the data has no sequence column (T, F unknown)")
        T, F = sequence
        return SequenceRNN(F, c.hidden[0], n_out, T, sequence_target=c.sequence_target,
                           truncate=c.bptt_truncate, dtype=np.dtype(c.dtype), seed=c.seed,
                           storage=storage)
    return MLP([n_in, *c.hidden, n_out], activation=c.activation, dtype=np.dtype(c.dtype),
               seed=c.seed, init=c.resolved_init, quantize_bits=c.quantize_bits,
               storage=storage)


def data_problems(config: TrainConfig, bundle: Any) -> list[str]:
    """What is wrong with `bundle` (a `DataBundle`) for `config.model`, every problem at once."""
    if config.model != "rnn":
        return []
    seq = getattr(bundle, "sequence", None)
    if seq is None:
        return [f"model: --model rnn needs one sequence feature column: fixed_size_list<"
                f"fixed_size_list<float, F>, T> or list<list<float>> (the features "
                f"{', '.join(bundle.feature_names[:5])} give {bundle.n_features} plain "
                "values per row)"]
    T = seq[0]
    p: list[str] = []
    if config.sequence_target == "every":
        # streaming keeps no training rows in memory: judge by the validation rows then
        y = bundle.y_train if bundle.y_train is not None else bundle.y_val
        width = None if y is None or y.ndim != 2 else y.shape[1]
        if bundle.task != "regression" or (y is not None and width != T):
            p.append(f"sequence_target: every needs a per-step regression target column "
                     f"(fixed_size_list<float, {T}> or list<float> of {T} values per row); "
                     f"target {', '.join(bundle.target_names)} is a {bundle.task} target"
                     + (f" of {width} values" if width else ""))
    return p


def time_buckets(model: Any) -> list[str]:
    """Labels of the model's time buckets ("t1-13", …); [] for a model without time steps."""
    return list(getattr(model, "time_buckets", ()))


__all__ = ["build_model", "data_problems", "time_buckets"]
