"""The explicit-backprop engine: NumPy only (no comm, runtime, ray, mpi4py or pyarrow)."""

from .jacobian import gradcheck, local_jacobian
from .layers import ACTIVATIONS, Dense, make_activation
from .losses import LOSSES, loss_and_grad, loss_value
from .model import MLP, Sequential, init_params_, load_model
from .params import ParamBuffer

__all__ = [
    "ACTIVATIONS", "LOSSES", "MLP", "Dense", "ParamBuffer", "Sequential", "gradcheck",
    "init_params_", "load_model", "local_jacobian", "loss_and_grad", "loss_value",
    "make_activation",
]
