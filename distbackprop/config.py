"""`TrainConfig`: one schema for CLI flags, YAML keys and the Python API.

Every field is a YAML key; the CLI flag is the field name with ``_`` → ``-``.
`validate()` reports every invalid value at once (``ConfigError`` carries the
list), before any worker starts.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh", "gelu", "softplus", "identity",
               "hardtanh", "sign", "round")
INITS = ("he", "xavier", "normal")
LOSSES = ("mse", "cross_entropy", "bce")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")
TASKS = ("classification", "regression")
MODELS = ("mlp", "rnn")


@dataclass(frozen=True)
class TrainConfig:
    """The whole training configuration (the README lists every flag)."""

    # data
    data: str | None = None
    val_data: str | None = None
    val_fraction: float | None = None
    target: str | tuple[str, ...] = "target"
    features: tuple[str, ...] | None = None
    task: str | None = None
    standardize: bool = True
    streaming: bool = False
    on_bad_rows: str = "error"
    # model
    model: str = "mlp"  # mlp | rnn (an Elman tanh RNN over sequence rows)
    hidden: tuple[int, ...] = (128,)
    activation: str = "relu"
    init: str | None = None
    dtype: str = "float32"
    remat_every: int | None = None
    quantize_bits: int | None = None
    bptt_truncate: int | None = None  # rnn: cut BPTT every K steps (None: full BPTT)
    sequence_target: str = "last"  # rnn: loss on the last step's readout, or on every step's
    # loss
    loss: str | None = None
    label_smoothing: float = 0.0
    # optimization
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 10
    max_steps: int | None = None
    clip_norm: float | None = None
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    lr_step_size: int = 1000
    lr_gamma: float = 0.1
    seed: int = 0
    # execution
    local: bool = False
    workers: int | str = 2  # N, or "MIN:MAX" for an elastic group
    cpus_per_worker: int = 1
    ray_address: str | None = None
    placement: str = "pack"
    update_on: str = "sharded"  # measured faster than "workers" at 2 workers (BENCHMARKS.md)
    overlap: bool | None = None
    node_shm: bool = True  # sharded: ranks on one machine share θ and gradients (/dev/shm)
    chunk_steps: int | None = None
    launcher: str = "ray"
    rendezvous_timeout: float = 60.0
    # gradient health
    vanish_threshold: float = 1e-7
    explode_threshold: float = 1e3
    on_nonfinite: str = "skip"
    max_consecutive_skips: int = 3
    sharpness_every: int | None = None
    # metrics
    metrics_port: int = 9400
    metrics_host: str = "127.0.0.1"
    metrics_linger: float = 0.0
    # state
    out: str | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 3
    resume: str | None = None
    max_failures: int = 3
    watchdog_seconds: float | None = None
    commit_seconds: float = 10.0
    # output
    quiet: bool = False

    # ---------------------------------------------------------------- helpers
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a mapping (YAML or flags); unknown keys are errors naming the key."""
        known = set(cls.field_names())
        bad = [f"{source}: unknown key {k!r}" for k in values if k not in known]
        if bad:
            raise ConfigError(bad)
        coerced, problems = {}, []
        for f in fields(cls):
            if f.name not in values:
                continue
            try:
                coerced[f.name] = _coerce(f, values[f.name])
            except (TypeError, ValueError) as exc:
                problems.append(f"{f.name}: {exc}")
        if problems:
            # Validate what did coerce, so every problem is reported in one go.
            try:
                cls(**coerced).validate()
            except ConfigError as exc:
                problems += [q for q in exc.problems
                             if q.split(":", 1)[0] not in {p.split(":", 1)[0] for p in problems}]
            raise ConfigError(problems)
        return cls(**coerced)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe mapping (tuples become lists), re-loadable by `from_dict`."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @property
    def effective_ray_address(self) -> str | None:
        return self.ray_address or os.environ.get("RAY_ADDRESS") or None

    def validate(self) -> TrainConfig:
        """Check every field; raise one `ConfigError` listing all problems."""
        p = self._value_problems() + self._relation_problems()
        if p:
            raise ConfigError(p)
        return self

    def _value_problems(self) -> list[str]:
        """Each field on its own: a known choice, a number in its range."""
        p: list[str] = []

        def choice(name: str, allowed: tuple[str, ...], optional: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if v not in allowed:
                p.append(f"{name}: {v!r} is not one of {', '.join(allowed)}")

        def positive(name: str, strict: bool = True, optional: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if v is None or (v <= 0 if strict else v < 0):
                p.append(f"{name}: must be {'> 0' if strict else '>= 0'}, got {v!r}")

        choice("model", MODELS)
        choice("sequence_target", ("last", "every"))
        positive("bptt_truncate", optional=True)
        choice("activation", ACTIVATIONS)
        choice("init", INITS, optional=True)
        choice("dtype", ("float32", "float64"))
        choice("loss", LOSSES, optional=True)
        choice("optimizer", OPTIMIZERS)
        choice("lr_schedule", SCHEDULES)
        choice("task", TASKS, optional=True)
        choice("on_bad_rows", ("error", "drop"))
        choice("update_on", ("workers", "coordinator", "sharded"))
        choice("launcher", ("ray", "mpi"))
        choice("placement", ("pack", "spread"))
        choice("on_nonfinite", ("skip", "abort"))
        positive("lr")
        positive("batch_size")
        positive("epochs")
        positive("max_steps", optional=True)
        positive("clip_norm", optional=True)
        positive("chunk_steps", optional=True)
        positive("checkpoint_every", optional=True)
        try:
            lo, hi = _worker_range(self.workers)
            if lo < 1 or hi < lo:
                p.append(f"workers: need 1 <= MIN <= MAX, got {self.workers!r}")
        except ValueError as exc:
            p.append(f"workers: {exc}")
        positive("cpus_per_worker")
        positive("keep_checkpoints")
        positive("rendezvous_timeout")
        positive("watchdog_seconds", optional=True)
        positive("commit_seconds", strict=False)
        positive("lr_step_size")
        positive("vanish_threshold", strict=False)
        positive("explode_threshold")
        positive("max_consecutive_skips")
        positive("sharpness_every", optional=True)
        positive("remat_every", optional=True)
        positive("weight_decay", strict=False)
        positive("warmup_steps", strict=False)
        positive("max_failures", strict=False)
        positive("metrics_linger", strict=False)
        return p

    def _relation_problems(self) -> list[str]:
        """Ranges that are not plain signs, and fields that must agree with each other."""
        p: list[str] = []
        if self.quantize_bits is not None and self.activation != "round":
            p.append(f"quantize_bits: only meaningful with activation 'round', "
                     f"not {self.activation!r}")
        elif self.quantize_bits is not None and not 1 <= self.quantize_bits <= 16:
            p.append(f"quantize_bits: must be an integer in 1..16, got {self.quantize_bits!r}")
        elif self.quantize_bits is None and self.activation == "round":
            p.append("quantize_bits: required with activation 'round' (K in 1..16)")
        if not 0.0 <= self.label_smoothing < 1.0:
            p.append(f"label_smoothing: must be in [0, 1), got {self.label_smoothing!r}")
        elif self.label_smoothing and self.loss not in (None, "cross_entropy"):
            # loss None is chosen from the task later; the trainer checks it then.
            p.append(f"label_smoothing: only meaningful with loss 'cross_entropy', "
                     f"not {self.loss!r}")
        if self.overlap and self.update_on == "sharded" and not self.local:
            p.append("overlap: only with --update-on workers (the sharded update, the "
                     "default, reduce-scatters the whole gradient after backward)")
        if not 0.0 <= self.momentum < 1.0:
            p.append(f"momentum: must be in [0, 1), got {self.momentum!r}")
        if not 0.0 < self.lr_gamma <= 1.0:
            p.append(f"lr_gamma: must be in (0, 1], got {self.lr_gamma!r}")
        if self.val_fraction is not None and not 0.0 <= self.val_fraction < 1.0:
            p.append(f"val_fraction: must be in [0, 1), got {self.val_fraction!r}")
        if not 0 <= self.metrics_port <= 65535:
            p.append(f"metrics_port: must be in 0..65535, got {self.metrics_port!r}")
        p += self._model_problems()
        if any(h <= 0 for h in self.hidden):
            p.append(f"hidden: every layer width must be > 0, got {list(self.hidden)}")
        if self.vanish_threshold >= self.explode_threshold:
            p.append("vanish_threshold: must be below explode_threshold")
        if self.data is not None and "://" not in self.data and not Path(self.data).exists():
            p.append(f"data: file not found: {self.data}")
        if (self.val_data is not None and "://" not in self.val_data
                and not Path(self.val_data).exists()):
            p.append(f"val_data: file not found: {self.val_data}")
        if self.val_data is not None and self.val_fraction is not None:
            p.append("val_fraction: cannot be combined with val_data (choose one)")
        if self.resume == "auto" and self.out is None:
            p.append("resume: 'auto' continues the run in --out DIR; give --out")
        elif self.resume not in (None, "auto") and not Path(self.resume).is_dir():
            p.append(f"resume: not a run directory: {self.resume}")
        return p

    def _model_problems(self) -> list[str]:
        """--model rnn: one state size; rnn-only fields left alone for the mlp."""
        p: list[str] = []
        if self.model == "rnn":
            if len(self.hidden) != 1:
                p.append(f"hidden: --model rnn takes one state size H (e.g. --hidden 64), got "
                         f"{list(self.hidden)}")
            if self.remat_every:
                p.append("remat_every: gradient checkpointing is for --model mlp; use "
                         "--bptt-truncate to bound what BPTT keeps")
            if self.quantize_bits is not None:
                p.append("quantize_bits: --model rnn has a tanh cell; no quantized activation")
            if self.sharpness_every:
                p.append("sharpness_every: Hessian-vector products are implemented for the "
                         "MLP only, not --model rnn")
        else:
            if self.bptt_truncate is not None:
                p.append("bptt_truncate: only meaningful with --model rnn")
            if self.sequence_target != "last":
                p.append("sequence_target: only meaningful with --model rnn")
        return p

    # derived defaults ------------------------------------------------------
    @property
    def resolved_init(self) -> str:
        if self.init:
            return self.init
        return "he" if self.activation in ("relu", "leaky_relu", "gelu", "softplus") else "xavier"

    @property
    def min_workers(self) -> int:
        return 1 if self.local else _worker_range(self.workers)[0]

    @property
    def max_workers(self) -> int:
        return 1 if self.local else _worker_range(self.workers)[1]

    @property
    def world_size(self) -> int:
        """The group size asked for (the most workers an elastic run uses)."""
        return self.max_workers

    def to_yaml(self) -> str:
        """The configuration as YAML, re-loadable with `--config`."""
        import yaml
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def read_yaml_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML file that must hold a mapping; `ConfigError` names the file otherwise."""
    import yaml
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config: file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: must hold a mapping of keys to values")
    return loaded


def _worker_range(v: int | str) -> tuple[int, int]:
    """`N` → (N, N); `"MIN:MAX"` → (MIN, MAX)."""
    if isinstance(v, int):
        return v, v
    lo, sep, hi = str(v).partition(":")
    try:
        return (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise ValueError(f"expected N or MIN:MAX, got {v!r}") from None


def _coerce(f: dataclasses.Field, v: Any) -> Any:
    """Coerce a YAML/flag value to the field's declared type (annotations are strings)."""
    t = str(f.type)
    if v is None:
        if "None" in t:
            return None
        raise ValueError("may not be empty")
    if f.name == "hidden":
        if isinstance(v, str):
            v = [s for s in v.replace(" ", "").split(",") if s]
        if isinstance(v, int):
            v = [v]
        return tuple(int(x) for x in v)
    if f.name == "workers":
        lo, hi = _worker_range(v if isinstance(v, int) and not isinstance(v, bool) else str(v))
        return lo if lo == hi else f"{lo}:{hi}"
    if f.name in ("features",):
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        return tuple(str(x) for x in v)
    if f.name == "target":
        if isinstance(v, str) and "," in v:
            return tuple(s.strip() for s in v.split(",") if s.strip())
        if isinstance(v, list | tuple):
            return tuple(str(x) for x in v) if len(v) > 1 else str(v[0])
        return str(v)
    if t.startswith("bool"):
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(v, str) and v.lower() in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"expected true/false, got {v!r}")
    if t.startswith("int"):
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError(f"expected an integer, got {v!r}")
        return int(v)
    if t.startswith("float"):
        if isinstance(v, bool):
            raise ValueError(f"expected a number, got {v!r}")
        return float(v)
    if t.startswith("str"):
        return str(v)
    return v


DEFAULT = TrainConfig()
__all__ = ["TrainConfig", "ConfigError", "DEFAULT", "read_yaml_mapping"]
