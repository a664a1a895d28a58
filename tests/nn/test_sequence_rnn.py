"""SequenceRNN: the RNN over flat rows equals the 3-D RNN, its gradient is exact (full BPTT),
per-time squared norms add over row slices, and model.npz round-trips through load_model."""

from __future__ import annotations

import numpy as np
import pytest

from distbackprop.errors import InputError
from distbackprop.nn import RNN, SequenceRNN, gradcheck, load_model


def _data(rng, n=6, T=7, F=3, every=False):
    x = rng.standard_normal((n, T * F))
    y = rng.standard_normal((n, T)) if every else rng.integers(0, 4, n)
    return x, y


@pytest.mark.parametrize("target", ["last", "every"])
def test_full_bptt_gradient_is_exact(target):
    rng = np.random.default_rng(0)
    x, y = _data(rng, every=target == "every")
    m = SequenceRNN(3, 5, 1 if target == "every" else 4, 7, target, seed=1)
    res = gradcheck(m, x, y, "mse" if target == "every" else "cross_entropy")
    assert res.rel_error < 1e-7


@pytest.mark.parametrize("truncate", [None, 3])
def test_matches_the_3d_rnn(truncate):
    rng = np.random.default_rng(1)
    x, y = _data(rng, every=True)
    flat = SequenceRNN(3, 5, 1, 7, "every", truncate, seed=2)
    ref = RNN(3, 5, 1, seed=2)
    lf = flat.loss_and_grad(x, y, "mse")
    lr = ref.loss_and_grad(x.reshape(6, 7, 3), y[:, :, None], "mse", denom=6, truncate=truncate)
    assert lf == pytest.approx(lr, rel=1e-12)
    np.testing.assert_allclose(flat.grads, ref.grads, rtol=1e-12)
    np.testing.assert_allclose(flat.time_sq, ref.time_grad_norms ** 2, rtol=1e-12)


def test_time_sq_adds_over_row_slices():
    """What the data-parallel step relies on: Σ over ranks' row slices = the whole batch."""
    rng = np.random.default_rng(3)
    x, y = _data(rng, n=9)
    m = SequenceRNN(3, 5, 4, 7, seed=0)
    m.loss_and_grad(x, y, "cross_entropy", denom=9)
    whole = m.time_sq.copy()
    parts = np.zeros_like(whole)
    for sl in (slice(0, 4), slice(4, 6), slice(6, 9)):
        m.loss_and_grad(x[sl], y[sl], "cross_entropy", denom=9)
        parts += m.time_sq
    np.testing.assert_allclose(parts, whole, rtol=1e-12)
    np.testing.assert_allclose(m.bucket_norms(parts), m.bucket_norms(whole), rtol=1e-12)


def test_save_load_round_trip_and_bad_architecture(tmp_path):
    m = SequenceRNN(3, 5, 2, 7, "last", 4, dtype=np.float32, seed=3, recurrent_gain=0.7)
    m.save(tmp_path / "m.npz", meta={"task": "classification"})
    back = load_model(tmp_path / "m.npz")
    assert isinstance(back, SequenceRNN)
    assert back.architecture() == m.architecture()
    assert np.array_equal(back.params, m.params) and back.meta == {"task": "classification"}
    x = np.random.default_rng(0).standard_normal((4, 21)).astype(np.float32)
    np.testing.assert_array_equal(back.predict(x), m.predict(x))
    arch = m.architecture()
    del arch["n_steps"]
    import json
    with np.load(tmp_path / "m.npz") as z:
        payload = {k: z[k] for k in z.files}
    header = json.loads(payload["header_json"].tobytes())
    header["architecture"] = arch
    payload["header_json"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(tmp_path / "bad.npz", **payload)
    with pytest.raises(InputError, match="architecture has no 'n_steps'"):
        load_model(tmp_path / "bad.npz")


def test_wrong_row_width_is_named():
    m = SequenceRNN(3, 5, 2, 7)
    with pytest.raises(ValueError, match=r"\(batch, 21\) = \(batch, T=7 × F=3\)"):
        m.forward(np.zeros((2, 20)))
