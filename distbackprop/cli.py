"""The `distbackprop` command: train, evaluate, predict, report, gradcheck, bench, data inspect.

Exit status: 0 success; 2 invalid configuration or input (every problem is
printed, naming the field, file, column or row); 1 training failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from .config import TrainConfig, read_yaml_mapping
from .errors import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2

_HELP = {
    "data": "Parquet file/dir, Arrow IPC (.arrow/.feather) or CSV; default: embedded digits",
    "val_data": "validation data (same formats)",
    "val_fraction": "held-out fraction when no --val-data (default 0.1)",
    "target": "target column(s), comma-separated for several regression targets",
    "features": "feature columns, comma-separated (default: every other numeric column)",
    "task": "classification|regression (default: inferred from the target's type)",
    "streaming": "stream row groups instead of memory-mapping the data",
    "on_bad_rows": "error|drop rows with NaN/inf",
    "model": "mlp|rnn (rnn: tanh Elman RNN over a sequence column of T steps x F features)",
    "hidden": "hidden layer widths, e.g. 128,64 (--model rnn: the state size H)",
    "bptt_truncate": "rnn: truncate backpropagation through time to K-step chunks",
    "sequence_target": "rnn: last|every - loss on the last step's readout or on every step's",
    "activation": "relu|leaky_relu|sigmoid|tanh|gelu|softplus|identity|hardtanh, or the "
                  "straight-through sign|round",
    "quantize_bits": "with --activation round: quantize to 2^K levels in [-1, 1]",
    "label_smoothing": "cross_entropy targets (1-eps)*onehot + eps/classes (default 0)",
    "init": "he|xavier|normal (he for relu-like, xavier otherwise)",
    "dtype": "float32|float64",
    "remat_every": "gradient checkpointing: keep every K-th layer's input, recompute the rest",
    "sharpness_every": "every N steps, export the top Hessian eigenvalue (power iteration)",
    "loss": "mse|cross_entropy|bce (default by task)",
    "optimizer": "sgd|momentum|nesterov|adam|adamw",
    "batch_size": "global batch size (split across workers)",
    "max_steps": "train exactly this many steps (overrides --epochs)",
    "clip_norm": "clip the global gradient norm to this value",
    "lr_schedule": "constant|cosine|step",
    "local": "one process: no Ray, no MPI",
    "workers": "data-parallel workers (Ray actors): N, or MIN:MAX for an elastic group",
    "ray_address": "join this Ray cluster (default $RAY_ADDRESS, else a local instance)",
    "placement": "pack|spread workers over nodes",
    "update_on": "workers|coordinator|sharded: where the optimizer step runs (sharded: "
                 "ZeRO-1, each worker updates its block of the parameters)",
    "overlap": "overlap bucketed allreduce with backward",
    "node_shm": "sharded update: workers on one machine share the parameters and read each "
                "other's gradients in /dev/shm, MPI only for the small reductions (off: "
                "Reduce_scatter + Allgather)",
    "chunk_steps": "steps per Ray call (default: about two seconds' worth)",
    "launcher": "ray|mpi (mpi: under mpiexec, rank 0 coordinates)",
    "vanish_threshold": "a layer whose gradient norm is below this is vanishing",
    "explode_threshold": "a layer whose gradient norm is above this (or non-finite) explodes",
    "on_nonfinite": "skip|abort a step whose gradient is non-finite",
    "metrics_port": "Prometheus port on the coordinator (0 = off)",
    "metrics_host": "bind address for metrics (default loopback)",
    "metrics_linger": "keep serving metrics this many seconds after training",
    "out": "run directory (default runs/<UTC timestamp>)",
    "checkpoint_every": "write a checkpoint every N steps",
    "resume": "continue the run in DIR from its newest good checkpoint; 'auto': continue "
              "--out DIR if it holds one, else start fresh",
    "max_failures": "worker-group restarts allowed before the run fails",
    "commit_seconds": "seconds between in-memory commits of the training state: a failure "
                      "rewinds at most this far (0 = every chunk)",
    "watchdog_seconds": "a chunk not back within this is a hang (default: from step time)",
    "rendezvous_timeout": "seconds for the workers to start and form the MPI group",
    "quiet": "no progress bar or messages",
}


def _add_config_flags(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    for f in dataclasses.fields(TrainConfig):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_ = _HELP.get(f.name, "")
        if str(f.type).startswith("bool"):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS,
                           help=f"{help_} (default: {default})".strip())
        else:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            p.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                           help=f"{help_} (default: {shown})".strip())


def build_config(args: argparse.Namespace) -> TrainConfig:
    """YAML file (if any) then flags on top; every invalid value reported at once."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    if getattr(args, "config", None):
        path = Path(args.config)
        loaded = read_yaml_mapping(path)
        known = set(TrainConfig.field_names())
        for k, v in loaded.items():
            key = str(k).replace("-", "_")
            if key not in known:
                problems.append(f"{path}: unknown key {k!r}")
            else:
                values[key] = v
    for name in TrainConfig.field_names():
        if name in vars(args):
            values[name] = getattr(args, name)
    try:
        cfg = TrainConfig.from_dict(values)
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems) from None
    if problems:
        raise ConfigError(problems)
    return cfg


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distbackprop", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (Ray workers by default; --local for one "
                       "process)")
    t.add_argument("--config", help="YAML file of the same keys (flags override it)")
    _add_config_flags(t)

    e = sub.add_parser("evaluate", help="loss and accuracy of a saved model on data")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--target", default=None)

    pr = sub.add_parser("predict", help="write predictions to a Parquet file")
    pr.add_argument("--model", required=True)
    pr.add_argument("--data", required=True)
    pr.add_argument("--out", required=True)

    r = sub.add_parser("report", help="PNG plots of a run under DIR/report/")
    r.add_argument("dir")

    g = sub.add_parser("gradcheck", help="finite-difference check of every parameter "
                       "(float64)")
    _add_config_flags(g, only=("hidden", "activation", "quantize_bits", "init", "loss", "data",
                               "target", "seed", "task", "features", "model", "bptt_truncate",
                               "sequence_target"))
    g.add_argument("--rows", type=int, default=8, help="examples in the check batch")
    g.add_argument("--tol", type=float, default=1e-6, help="relative error tolerance")

    b = sub.add_parser("bench", help="benchmarks, each against its reference in the same run")
    b.add_argument("which", nargs="?", default="all",
                   choices=["compute", "data", "allreduce", "rendezvous", "scaling",
                            "coordination", "soak", "memory", "hvp", "rnn", "nodeloss", "all"])
    b.add_argument("--json", action="store_true")
    b.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    di = dsub.add_parser("inspect", help="schema, rows, task, class and NaN counts")
    di.add_argument("path")
    di.add_argument("--target", default="target")
    di.add_argument("--json", action="store_true")
    return p


def _thread_env(args: argparse.Namespace) -> None:
    """BLAS and update-kernel threads for this process, set before NumPy loads (a value the
    user exported wins). Ray workers get theirs from the runtime env of their actor."""
    import os

    from .threads import blas_env
    cpus = getattr(args, "cpus_per_worker", None) or 1
    try:
        cpus = int(cpus)
    except (TypeError, ValueError):
        return  # build_config reports the bad value
    for k, v in blas_env(cpus).items():
        os.environ.setdefault(k, v)


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside training (where the trainer's graceful stop is not installed)."""


def _terminate(signum, frame) -> None:
    # `ray job stop`, `docker stop` and systemd send SIGTERM: wind down like Ctrl-C, so
    # whatever was started is stopped by the finally-blocks on the way out.
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _terminate)
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            # Inherited (a non-interactive shell's background job, `nohup … &`): SIGINT
            # still stops a run, and ends --metrics-linger with 130, as documented.
            signal.signal(signal.SIGINT, signal.default_int_handler)
    args = _parser().parse_args(argv)
    if args.command == "train":
        _thread_env(args)
    try:
        return _dispatch(args, started)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"distbackprop: error: {problem}", file=sys.stderr)
        return EXIT_INVALID
    except _Terminated:
        print("distbackprop: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("distbackprop: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace, started: float) -> int:
    cmd = args.command
    if cmd == "train":
        return _train(args, started)
    if cmd == "evaluate":
        print(json.dumps(evaluate(args.model, args.data, args.target)))
        return EXIT_OK
    if cmd == "predict":
        n = predict(args.model, args.data, args.out)
        print(f"wrote {n} predictions to {args.out}", file=sys.stderr)
        return EXIT_OK
    if cmd == "report":
        from .report import make_report
        if not Path(args.dir, "history.parquet").exists():
            raise ConfigError(f"report: {args.dir} has no history.parquet (not a run directory)")
        for path in make_report(args.dir):
            print(path)
        return EXIT_OK
    if cmd == "gradcheck":
        return _gradcheck(args)
    if cmd == "bench":
        from .bench import main as bench_main
        return bench_main(args.which, as_json=args.json, quick=args.quick)
    if cmd == "data":
        from .data import format_inspect, inspect
        info = inspect(args.path, target=args.target)
        print(json.dumps(info, indent=2, default=str) if args.json else format_inspect(info))
        return EXIT_OK
    raise AssertionError(cmd)  # pragma: no cover


def _train(args: argparse.Namespace, started: float) -> int:
    from .runtime.coordinator import TrainingFailed
    from .runtime.trainer import Trainer
    cfg = build_config(args)
    try:
        result = Trainer(cfg, started=started).fit()  # --launcher mpi: run_mpi, via fit
    except TrainingFailed as exc:
        print(f"distbackprop: training failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if result is None:  # a non-root rank under mpiexec
        return EXIT_OK
    if result.status == "interrupted":
        print(f"distbackprop: stopped at step {result.summary['steps']}; everything is saved "
              f"in {result.run_dir} (continue with --resume {result.run_dir})",
              file=sys.stderr)
        return result.exit_status
    if not cfg.quiet:
        s = result.summary
        parts = [f"steps {s['steps']}", f"train_loss {s['train_loss']:.4f}"]
        if s.get("val_loss") is not None:
            parts.append(f"val_loss {s['val_loss']:.4f}")
        if s.get("val_accuracy") is not None:
            parts.append(f"val_accuracy {s['val_accuracy']:.4f}")
        parts.append(f"{s['samples_per_second']:.0f} samples/s")
        print(f"{' · '.join(parts)}\nrun directory: {result.run_dir}", file=sys.stderr)
    return EXIT_OK


def _load(model_path: str):
    from .nn import load_model
    p = Path(model_path)
    if not p.exists():
        raise ConfigError(f"model: file not found: {p}")
    try:
        return load_model(p)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None


def evaluate(model_path: str, data: str, target: str | None = None) -> dict[str, Any]:
    """{"loss", "accuracy" (classification), "samples"} of a saved model on `data`."""
    import numpy as np

    from .data import prepare_inference
    from .nn.losses import loss_value
    model = _load(model_path)
    target = target or ",".join(model.meta.get("target_names") or ["target"])
    x, y, _ = prepare_inference(model.meta, data, target, dtype=model.dtype)
    if y is None:
        raise ConfigError(f"target: {data} has no target column to evaluate against")
    y_hat = model.predict(x)
    loss = model.meta.get("loss") or ("cross_entropy" if model.meta.get("task") ==
                                      "classification" else "mse")
    out: dict[str, Any] = {"loss": loss_value(loss, y_hat, y), "samples": int(x.shape[0])}
    if model.meta.get("task") == "classification":
        pred = (y_hat[:, 0] > 0).astype(np.int64) if y_hat.shape[1] == 1 else y_hat.argmax(1)
        out["accuracy"] = float(np.mean(pred == y))
    return out


def predict(model_path: str, data: str, out: str) -> int:
    from .data import write_predictions
    model = _load(model_path)
    return write_predictions(model, data, out)


def _gradcheck(args: argparse.Namespace) -> int:
    import numpy as np

    from .data import load_training_data
    from .nn import LOSSES, gradcheck
    from .nn.layers import STRAIGHT_THROUGH
    from .runtime.models import build_model, data_problems
    from .runtime.trainer import output_size
    values = {k: getattr(args, k) for k in TrainConfig.field_names() if k in vars(args)}
    cfg = TrainConfig.from_dict({**values, "dtype": "float64", "val_fraction": 0.0}).validate()
    bundle = load_training_data(cfg)
    if data_problems(cfg, bundle):
        raise ConfigError(data_problems(cfg, bundle))
    rows = max(1, min(args.rows, bundle.x_train.shape[0]))
    x = np.ascontiguousarray(bundle.x_train[:rows], dtype=np.float64)
    y = bundle.y_train[:rows]
    losses = [cfg.loss] if cfg.loss else [
        lo for lo in LOSSES if (lo == "cross_entropy") == (bundle.task == "classification")
        and not (lo == "bce" and bundle.task == "classification" and bundle.n_outputs != 2)]
    ok = True
    if cfg.activation in STRAIGHT_THROUGH:
        print(f"note: {cfg.activation} is a straight-through estimator: its backward is a "
              "surrogate, not the derivative, so finite differences are not expected to agree")
    print(f"{'loss':<14} {'parameter':<12} {'shape':<12} {'rel. error':>11}")
    for loss in losses:
        n_out = output_size(loss, bundle.task, bundle.n_outputs)
        model = build_model(cfg, x.shape[1], n_out, bundle.sequence)  # cfg is float64
        res = gradcheck(model, x, y, loss)
        for name, err in res.per_param.items():
            shape = "×".join(map(str, model.buffer.shapes[name]))
            flag = "" if err < args.tol else "  MISMATCH"
            kinked = (f"  ({res.kinks[name]} entries excluded: stencil crosses a kink)"
                      if name in res.kinks else "")
            print(f"{loss:<14} {name:<12} {shape:<12} {err:>11.2e}{flag}{kinked}")
        ok &= res.ok(args.tol)
        print(f"{loss:<14} {'all':<12} {res.n_checked:<12} {res.rel_error:>11.2e}")
    print("gradcheck: " + ("OK" if ok else f"FAILED (tolerance {args.tol:g})"))
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
