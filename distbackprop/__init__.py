"""distbackprop: explicit NumPy backpropagation, data-parallel on Ray with an mpi4py allreduce."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Trainer", "TrainConfig", "Result", "load_model", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import distbackprop.nn` never drags in ray, mpi4py or pyarrow.
    if name == "TrainConfig":
        from .config import TrainConfig
        return TrainConfig
    if name in ("Trainer", "Result"):
        from .runtime import trainer
        return getattr(trainer, name)
    if name == "load_model":
        from .nn import load_model
        return load_model
    raise AttributeError(name)
