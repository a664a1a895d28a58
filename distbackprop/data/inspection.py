"""``distbackprop data inspect PATH``: what a user checks before training.

`inspect` reads every file once (batch by batch) and reports the schema, row
count, the task and features training would infer, class counts or target
ranges, and per column the rows holding a null, NaN or ±inf value. Problems
training would refuse (a missing target, a variable-length list, a string column
of numbers) are listed rather than raised; an unreadable file still raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distbackprop.data.errors import DataError
from distbackprop.data.schema import (
    VARIABLE,
    ColumnPlan,
    first_non_number,
    flat_list_values,
    label_array,
    nonfinite_rows,
    normalize_names,
    plan_columns,
)
from distbackprop.data.sources import Source, check_fragment_columns, open_source, read_error

if TYPE_CHECKING:
    import pyarrow.dataset as ds

_READ_ROWS = 1 << 16


def _bad_count(arr: pa.Array) -> int:
    """Rows of ``arr`` that are null, NaN or ±inf (any element, for fixed-size lists)."""
    t = arr.type
    if pa.types.is_floating(t):
        finite = pc.is_finite(arr)
        return int(len(arr) - (pc.sum(finite).as_py() or 0))
    if pa.types.is_fixed_size_list(t):
        if len(arr) == 0:
            return 0
        flat = np.asarray(flat_list_values(arr), dtype=np.float64).reshape(len(arr), -1)
        return int(nonfinite_rows(flat).sum())
    return arr.null_count


def inspect(path: str, target: str | Sequence[str] | None = "target") -> dict[str, Any]:
    """Schema, rows, inferred task, class counts and NaN counts of the data at ``path``.

    Returns a JSON-serialisable dict (keys: source, format, files, row_groups,
    rows, schema, target, task, features, n_features, class_counts,
    target_summary, nan_counts, problems, warnings, notes). ``warnings`` are what
    training would do differently from what the file holds (a column left out).
    """
    src = open_source(path, "data")
    schema = src.schema
    targets = normalize_names(target)
    plan, problems = _plan_or_problems(schema, path, targets, src.partition_columns)
    classify = bool(plan is not None and plan.task == "classification" and plan.target_names)
    tally = _tally_files(src, schema, plan, targets, classify)
    problems.extend(tally.problems)
    problems.extend(_tally_problems(tally, plan, path))
    notes = list(plan.notes) if plan else []
    warnings = list(plan.warnings) if plan else []
    roles = _column_roles(plan, src.partition_columns, targets, schema.names)
    sequence = _sequence(src, plan)
    summary = None
    if plan is not None and plan.task == "regression" and tally.tsum:
        summary = {t: {"min": s[0], "max": s[1], "mean": s[2] / s[3] if s[3] else None}
                   for t, s in tally.tsum.items()}
    return {
        "source": path,
        "format": src.format,
        "files": len(src.fragments),
        "row_groups": tally.row_groups if src.format == "parquet" else None,
        "rows": tally.rows,
        "schema": [{"name": f.name, "type": str(f.type), "role": roles.get(f.name, "ignored"),
                    "nan_count": tally.nan_counts[f.name]} for f in schema],
        "target": list(targets) or None,
        "task": plan.task if plan is not None and plan.target_names else None,
        "features": list(plan.feature_names) if plan else [],
        "n_features": (sequence[0] * sequence[1] if sequence else
                       plan.n_features if plan else None),
        "sequence": {"steps": sequence[0], "features": sequence[1]} if sequence else None,
        "class_counts": ({str(k): v for k, v in sorted(tally.class_counts.items(),
                                                        key=_label_key)}
                         if classify else None),
        "target_summary": summary,
        "nan_counts": {c: n for c, n in tally.nan_counts.items()},
        "problems": problems,
        "warnings": warnings,
        "notes": notes,
    }


def _plan_or_problems(schema: pa.Schema, path: str, targets: tuple[str, ...],
                      partition_columns: Sequence[str]) -> tuple[ColumnPlan | None, list[str]]:
    """``(plan, problems)``: the training plan, else a features-only plan and its problems."""
    try:
        plan = plan_columns(schema, source=path, target=targets or None,
                            task=None if targets else "regression",
                            partition_columns=partition_columns)
        return plan, []
    except DataError as exc:
        problems = list(exc.problems)
    try:  # still show which columns would be features
        plan = plan_columns(schema, source=path, target=None, task="regression",
                            partition_columns=partition_columns)
    except DataError:
        plan = None
    return plan, problems


@dataclass
class _Tally:
    """What one read of every file counts, batch by batch."""

    nan_counts: dict[str, int]
    tsum: dict[str, list]  # per target: [min, max, sum, count] of its finite values
    # per suspect column: [numbers, valid values, first non-number row, (file, its value)]
    suspects: dict[str, list]
    class_counts: dict[Any, int] = field(default_factory=dict)
    rows: int = 0
    row_groups: int = 0
    # first non-integral float label: (file, row in file, value), for the problem message
    non_integral: tuple[str, int, float] | None = None
    problems: list[str] = field(default_factory=list)

    def add_labels(self, labels: pa.Array, path: str, file_row: int) -> None:
        """Count each class in ``labels``; remember the first non-integral float label."""
        if self.non_integral is None and pa.types.is_floating(labels.type):
            v = labels.to_numpy(zero_copy_only=False).astype(np.float64)
            frac = np.flatnonzero(np.isfinite(v) & (v != np.round(v)))
            if len(frac):
                self.non_integral = (path, file_row + int(frac[0]), float(v[frac[0]]))
        counts = pc.value_counts(labels)
        for item in counts.to_pylist():
            if item["values"] is not None:
                self.class_counts[item["values"]] = (self.class_counts.get(item["values"], 0)
                                                     + item["counts"])

    def add_targets(self, batch: pa.RecordBatch) -> None:
        """Fold the finite target values of ``batch`` into min, max, sum and count."""
        for t in self.tsum:
            v = batch.column(t).to_numpy(zero_copy_only=False).astype(np.float64)
            v = v[np.isfinite(v)]
            if len(v):
                s = self.tsum[t]
                s[0], s[1] = min(s[0], v.min()), max(s[1], v.max())
                s[2] += float(v.sum())
                s[3] += len(v)

    def add_suspects(self, table: pa.Table, path: str, file_row: int) -> None:
        """Count numbers and valid values per suspect column; remember its first non-number."""
        for c, st in self.suspects.items():
            numbers, row, value = first_non_number(table, c)
            st[0] += numbers
            st[1] += table.num_rows - table.column(c).null_count
            if st[2] < 0 and row >= 0:
                st[2], st[3] = file_row + row, (path, value)


def _tally_files(src: Source, schema: pa.Schema, plan: ColumnPlan | None,
                 targets: tuple[str, ...], classify: bool) -> _Tally:
    """The `_Tally` of every file of ``src``, with the problems of files missing columns."""
    names = schema.names
    tally = _Tally(nan_counts=dict.fromkeys(names, 0),
                   tsum={t: [np.inf, -np.inf, 0.0, 0] for t in targets if t in names},
                   suspects={c: [0, 0, -1, None] for c in (plan.suspects if plan else ())})
    for frag in src.fragments:
        try:
            check_fragment_columns(src, frag, names)
        except DataError as exc:
            tally.problems.extend(exc.problems)
        if src.format == "parquet":
            try:
                tally.row_groups += frag.num_row_groups
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"data: cannot read {frag.path}: {exc}") from exc
        try:
            _tally_file(tally, frag, schema, plan, classify)
        except (pa.ArrowException, OSError) as exc:
            raise read_error(frag, exc) from exc
    return tally


def _tally_file(tally: _Tally, frag: ds.Fragment, schema: pa.Schema, plan: ColumnPlan | None,
                classify: bool) -> None:
    """Add every batch of the file ``frag`` to ``tally``."""
    file_row = 0  # rows of this file before the current batch: messages count per file
    for batch in frag.to_batches(schema=schema, batch_size=_READ_ROWS):
        table = pa.Table.from_batches([batch])
        for c in schema.names:
            tally.nan_counts[c] += _bad_count(batch.column(c))
        if classify:
            tally.add_labels(label_array(table, plan.target_names[0]), frag.path, file_row)
        elif plan is not None:
            tally.add_targets(batch)
        tally.add_suspects(table, frag.path, file_row)
        tally.rows += batch.num_rows
        file_row += batch.num_rows


def _tally_problems(tally: _Tally, plan: ColumnPlan | None, path: str) -> list[str]:
    """Problems only the values show: string columns of numbers, no rows, non-integral labels."""
    problems = []
    for c, (numbers, valid, row, info) in tally.suspects.items():
        if row >= 0 and numbers * 2 > valid:
            problems.append(f"data: column {c!r} of {info[0]} is not numeric: row {row} holds "
                            f"{info[1]!r} ({numbers} of {valid} values are numbers)")
    if tally.rows == 0:
        problems.append(f"data: {path} has no rows")
    if tally.non_integral is not None:
        f, r, v = tally.non_integral
        problems.append(f"data: classification target {plan.target_names[0]!r} holds "
                        f"non-integral value {v!r} at row {r} of {f}; use --task regression")
    return problems


def _column_roles(plan: ColumnPlan | None, partition_columns: Sequence[str],
                  targets: tuple[str, ...], names: Sequence[str]) -> dict[str, str]:
    """Column name → feature, ignored, partition or target (later roles win)."""
    roles = {}
    if plan is not None:
        roles.update(dict.fromkeys(plan.feature_names, "feature"))
        roles.update(dict.fromkeys(plan.ignored, "ignored"))
        roles.update(dict.fromkeys(plan.suspects, "ignored"))
    roles.update(dict.fromkeys(partition_columns, "partition"))
    roles.update(dict.fromkeys([t for t in targets if t in names], "target"))
    return roles


def _label_key(item: tuple) -> tuple:
    k = item[0]
    return (0, k, "") if isinstance(k, int | float | bool) else (1, 0, str(k))


def _sequence(src: Any, plan: ColumnPlan | None) -> tuple[int, int] | None:
    """(T, F) of the one sequence feature column: from its type, or for list<list> from the
    first row (training refuses rows that differ from it)."""
    if plan is None or len(plan.feature_names) != 1:
        return None
    if plan.sequence is not None:
        return plan.sequence
    if plan.feature_widths[0] != VARIABLE or not src.fragments:
        return None
    head = src.fragments[0].head(1, columns=[plan.feature_names[0]]).column(0).to_pylist()
    if not head or not head[0] or head[0][0] is None:
        return None
    return len(head[0]), len(head[0][0])


def format_inspect(d: dict[str, Any]) -> str:
    """Human-readable text of an `inspect` result."""
    lines = []
    groups = f", {d['row_groups']} row group(s)" if d.get("row_groups") is not None else ""
    lines.append(f"source:   {d['source']} ({d['format']}, {d['files']} file(s){groups})")
    lines.append(f"rows:     {d['rows']}")
    if d.get("target"):
        task = d.get("task") or "?"
        extra = ""
        if d.get("class_counts") is not None:
            extra = f", {len(d['class_counts'])} classes"
        lines.append(f"target:   {', '.join(d['target'])} → {task}{extra}")
    feats = d.get("features") or []
    if feats:
        shown = ", ".join(feats[:6]) + (f", … ({len(feats)} columns)" if len(feats) > 6 else "")
        lines.append(f"features: {d['n_features']} ({shown})")
    if d.get("sequence"):
        q = d["sequence"]
        lines.append(f"sequence: T = {q['steps']} steps × F = {q['features']} features per step")
    width = max([len(c["name"]) for c in d["schema"]] + [6])
    twidth = max([len(c["type"]) for c in d["schema"]] + [4])
    lines.append("")
    lines.append(f"{'column':<{width}}  {'type':<{twidth}}  {'role':<9}  NaN/null")
    for c in d["schema"]:
        lines.append(f"{c['name']:<{width}}  {c['type']:<{twidth}}  {c['role']:<9}  "
                     f"{c['nan_count']}")
    if d.get("class_counts"):
        lines.append("")
        lines.append("class counts:")
        lines.append("  " + "  ".join(f"{k}: {v}" for k, v in d["class_counts"].items()))
    if d.get("target_summary"):
        lines.append("")
        for t, s in d["target_summary"].items():
            lines.append(f"target {t}: min {s['min']:.6g}, max {s['max']:.6g}, "
                         f"mean {s['mean']:.6g}" if s["mean"] is not None else
                         f"target {t}: no finite values")
    for w in d.get("warnings") or []:
        lines.append(f"warning: {w}")
    for n in d.get("notes") or []:
        lines.append(f"note: {n}")
    lines.append("")
    if d.get("problems"):
        lines.append("problems:")
        lines.extend(f"  - {p}" for p in d["problems"])
    else:
        lines.append("problems: none")
    return "\n".join(lines)
