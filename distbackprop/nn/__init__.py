"""The explicit-backprop engine: NumPy only (no comm, runtime, ray, mpi4py or pyarrow)."""

from .hessian import HessianOperator, NewtonCG, allreduce_hvp_, hvp, top_eigenvalue
from .implicit import FixedPointError, ImplicitModel
from .jacobian import GradcheckResult, gradcheck, local_jacobian
from .layers import ACTIVATIONS, STRAIGHT_THROUGH, Activation, Dense, make_activation
from .losses import LOSSES, loss_and_grad, loss_value
from .meta import maml_loss_and_grad
from .model import MLP, Sequential, init_params_, load_model
from .params import ParamBuffer
from .remat import CheckpointedMLP
from .rnn import RNN, SequenceRNN, bucket_time_norms, time_ratio

__all__ = [
    "ACTIVATIONS", "LOSSES", "MLP", "RNN", "STRAIGHT_THROUGH", "Activation", "CheckpointedMLP",
    "Dense", "FixedPointError", "GradcheckResult", "HessianOperator", "ImplicitModel", "NewtonCG",
    "ParamBuffer", "Sequential", "SequenceRNN",
    "allreduce_hvp_", "bucket_time_norms", "gradcheck", "hvp", "init_params_", "load_model",
    "local_jacobian", "loss_and_grad", "loss_value", "make_activation", "maml_loss_and_grad",
    "time_ratio", "top_eigenvalue",
]
