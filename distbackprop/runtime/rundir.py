"""`RunDir`: the run directory and every file in it, each written atomically.

config.yaml (the resolved configuration, re-runnable with ``--config``),
summary.json, model.npz, history.parquet, memory.parquet, and checkpoints/
(step-<8 digits>/, sha256 manifest) — see the README's run-directory section.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_text
from ..config import TrainConfig, read_yaml_mapping
from ..errors import ConfigError


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])


class RunDir:
    """One run's directory. Nothing is created until `create()`."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else \
            Path("runs") / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")

    def __str__(self) -> str:
        return str(self.path)

    config_path = property(lambda self: self.path / "config.yaml")
    summary_path = property(lambda self: self.path / "summary.json")
    model_path = property(lambda self: self.path / "model.npz")
    history_path = property(lambda self: self.path / "history.parquet")
    memory_path = property(lambda self: self.path / "memory.parquet")
    cache_dir = property(lambda self: self.path / ".cache")

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    # configuration ---------------------------------------------------------------
    def write_config(self, cfg: TrainConfig) -> None:
        atomic_write_text(self.config_path, cfg.to_yaml())

    def read_config(self) -> TrainConfig:
        if not self.config_path.exists():
            raise ConfigError(f"resume: {self.config_path} not found (not a distbackprop "
                              "run directory)")
        return TrainConfig.from_dict(read_yaml_mapping(self.config_path),
                                     source=str(self.config_path))

    # results ---------------------------------------------------------------------
    def write_summary(self, summary: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in summary.items()}
        atomic_write_text(self.summary_path, json.dumps(clean, indent=2, default=float) + "\n")

    def write_model(self, model, meta: dict[str, Any]) -> None:
        model.save(self.model_path, meta=meta)

    # checkpoints -----------------------------------------------------------------
    def save_checkpoint(self, step: int, arrays: dict[str, np.ndarray], meta: dict[str, Any],
                        keep: int) -> Path:
        from ..checkpoint import save_checkpoint
        return save_checkpoint(self.path, step, arrays, meta, keep=keep)

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest checkpoint that verifies (a damaged newer one is skipped, with a warning)."""
        from ..checkpoint import latest_checkpoint
        found = latest_checkpoint(self.path) if self.path.is_dir() else None
        return None if found is None else Checkpoint(found[0], dict(found[1]), found[2])

    def newest_checkpoint_path(self) -> Path | None:
        from ..checkpoint import list_checkpoints
        cps = list_checkpoints(self.path) if self.path.is_dir() else []
        return cps[-1] if cps else None


__all__ = ["Checkpoint", "RunDir"]
