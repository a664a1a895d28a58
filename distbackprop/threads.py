"""Thread settings for a process that trains on `cpus` cores (no NumPy here: these must be
set before NumPy loads).
"""

from __future__ import annotations

# OpenBLAS threads spin for 2^THREAD_TIMEOUT cycles after each call before sleeping; the
# default (2^28, ~0.1 s) keeps both cores busy through the update that follows a backward.
# Measured in the reference step: see `blas_env`.
BLAS_THREAD_TIMEOUT = 4


def blas_env(cpus: int) -> dict[str, str]:
    """Environment for a process that trains with `cpus` cores: set it before NumPy loads
    (the CLI at start-up, each Ray actor through runtime_env={"env_vars": …}).

    BLAS and the update kernels get `cpus` threads each (they never run at the same time);
    OpenBLAS threads go to sleep right after a call instead of spinning through the update.
    """
    n = str(max(1, int(cpus)))
    return {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n,
            "NUMBA_NUM_THREADS": n, "NUMBA_THREADING_LAYER": "workqueue",
            "OPENBLAS_THREAD_TIMEOUT": str(BLAS_THREAD_TIMEOUT)}


__all__ = ["BLAS_THREAD_TIMEOUT", "blas_env"]
