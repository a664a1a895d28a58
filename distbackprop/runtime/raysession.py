"""The Ray session of one run: join `--ray-address`, or start a private local instance.

Without an address the run never attaches to a cluster found through Ray's
address file (`ray.init()` would, even to a dead one whose file was left
behind): it starts a private instance (`address="local"`), so a `ray start
--head` running on the machine makes no difference and is left untouched.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from ..errors import ConfigError

# Token authentication, which every deploy config relies on, exists from Ray 2.52.
MIN_RAY_FOR_TOKEN = (2, 52)


class RayUnreachable(RuntimeError):
    """`--ray-address` names a cluster that cannot be joined (exit status 1)."""


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:2] if p.isdigit())


def start_ray(address: str | None, num_cpus: int) -> bool:
    """Join `address`, or start a private local instance with `num_cpus` logical CPUs.

    Returns True when this call started Ray (the caller then shuts it down);
    False when Ray was already initialised in this process.
    """
    import ray
    if os.environ.get("RAY_AUTH_MODE") == "token" and _version(ray.__version__) < \
            MIN_RAY_FOR_TOKEN:
        raise ConfigError(f"ray: RAY_AUTH_MODE=token needs Ray >= 2.52; this is Ray "
                          f"{ray.__version__} (pip install 'ray[default]>=2.52')")
    if ray.is_initialized():
        return False
    # Ray's usage-stats report tries to reach the internet at start-up; on a closed
    # network that costs seconds (measured here: ray.init 8.9 s → 4.0 s).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "configure_logging": False}
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:  # noqa: BLE001 - Ray raises several types here
            raise RayUnreachable(f"cannot join the Ray cluster at {address}: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                                 ) from None
    else:
        for key, value in QUIET_DAEMONS.items():
            os.environ.setdefault(key, value)
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    return True


# For a private instance, whose daemons share the cores with the ranks and whose only
# reader is this process (`log_to_driver=False`, no dashboard): what Ray's daemons do
# there on a timer for readers that do not exist is time a spinning rank loses (a pair
# of ranks on 2 cores runs at the pace of whichever the daemons interrupt). The daemons
# inherit these from this process's environment; values the user set are kept.
QUIET_DAEMONS = {
    # the log monitor re-lists the session's log directory ten times a second while it
    # holds fewer than 1000 files; once every 5 s took it from ~1.2% to ~0.5% of one core
    # idle here (it grew to 2.4% as a long-lived instance's log files went from 37 to 88)
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "5",
    # Ray's own metrics (recorded in every worker, raylet and GCS, exported through the
    # dashboard agent), which no Prometheus scrapes here: the project exports its own
    "RAY_enable_metrics_collection": "0",
    # the dashboard agent's scan of every process (psutil) for the dashboard's node view,
    # every 5 s by default; once a minute
    "REPORTER_UPDATE_INTERVAL_MS": "60000",
}


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a `host:port` nobody listens on (`ray.init` would retry for minutes)."""
    import socket
    import time
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return  # "auto", ray:// client addresses: leave them to Ray
    end = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2.0):
                return
        except OSError as exc:
            if time.monotonic() >= end:
                raise RayUnreachable(f"cannot join the Ray cluster at {address}: nothing "
                                     f"answers there ({exc.strerror or exc})") from None
            time.sleep(0.5)


def stop_ray() -> None:
    import ray
    ray.shutdown()


def cluster_cpus() -> float:
    import ray
    return float(ray.cluster_resources().get("CPU", 0))


def available_cpus() -> float:
    import ray
    return float(ray.available_resources().get("CPU", 0))


def placeable_workers(cpus_per_worker: int) -> int:
    """How many workers of `cpus_per_worker` CPUs the cluster could place now, node by node."""
    import ray
    try:
        per_node = ray._private.state.state.available_resources_per_node()
        return int(sum(r.get("CPU", 0) // cpus_per_worker for r in per_node.values()))
    except Exception:  # noqa: BLE001 - private API moved: fall back to the cluster total
        return int(available_cpus() // cpus_per_worker)




@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """A private local Ray instance for the block (or the one this process already runs)."""
    started = start_ray(None, num_cpus)
    try:
        yield
    finally:
        if started:
            stop_ray()


class Actors:
    """`n` Ray actors, each a thin shell around a plain `cls()` instance (benchmarks)."""

    def __init__(self, cls: type, n: int, num_cpus: float = 1):
        import ray
        self._ray = ray
        shell = ray.remote(num_cpus=num_cpus)(cls)
        self.handles = [shell.remote() for _ in range(n)]

    def call(self, method: str, *args: Any, timeout: float = 600, each: list | None = None
             ) -> list:
        """`method(*args)` on every actor (or `method(*each[i])` on actor i); the results."""
        calls = each if each is not None else [args] * len(self.handles)
        refs = [getattr(h, method).remote(*a) for h, a in zip(self.handles, calls, strict=True)]
        return self._ray.get(refs, timeout=timeout)

    def call_one(self, i: int, method: str, *args: Any, timeout: float = 120) -> Any:
        return self._ray.get(getattr(self.handles[i], method).remote(*args), timeout=timeout)

    def object_store_sum(self, get: str, put: str) -> None:
        """What a Ray user without MPI writes: every actor's `get()` array into the object
        store, summed on the driver, the sum `ray.put` once and handed to every `put(sum)`."""
        arrays = self.call(get)
        total = arrays[0].copy()
        for a in arrays[1:]:
            total += a
        ref = self._ray.put(total)
        self._ray.get([getattr(h, put).remote(ref) for h in self.handles])

    def close(self) -> None:
        for h in self.handles:
            with contextlib.suppress(Exception):
                self._ray.kill(h, no_restart=True)
        self.handles = []


__all__ = ["Actors", "RayUnreachable", "available_cpus", "cluster_cpus", "local_ray",
           "placeable_workers", "start_ray", "stop_ray"]
