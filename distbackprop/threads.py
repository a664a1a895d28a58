"""Thread settings for a process that trains on `cpus` cores (no NumPy here: these must be
set before NumPy loads).
"""

from __future__ import annotations


def blas_env(cpus: int, thread_timeout: int | None = None) -> dict[str, str]:
    """Environment for a process that trains with `cpus` cores: set it before NumPy loads
    (the CLI at start-up, each Ray actor through runtime_env={"env_vars": …}).

    BLAS and the update kernels get `cpus` threads each (they never run at the same time);
    the kernels use numba's workqueue layer, whose threads block between calls instead of
    spinning. `thread_timeout` sets OPENBLAS_THREAD_TIMEOUT (OpenBLAS threads spin 2^v
    cycles after a call before sleeping; 4 is the minimum). Left unset by default: with
    the fused update, 4 measured no faster in the reference step (update 2.3–2.6 ms either
    way), while it had made the old NumPy update 8.3 → 5.3 ms.
    """
    n = str(max(1, int(cpus)))
    env = {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n,
           "NUMBA_NUM_THREADS": n, "NUMBA_THREADING_LAYER": "workqueue"}
    if thread_timeout is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = str(int(thread_timeout))
    return env


__all__ = ["blas_env"]
