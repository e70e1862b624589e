"""`cnnflow runs`: the most recent MLflow runs as a table (or JSON), read through flows.tracking.

What tells runs apart comes first: the table's parameters are those whose values differ
among the runs listed (a sweep's normalization, batch size, seed ...), under short names,
and a narrow terminal gives up the experiment, parent and start time before them.
"""

from __future__ import annotations

import sys
import time

from ..metrics import BEST_VAL_ACC, TEST_ACC, VAL_ACC, read

# Shown when no parameter differs among the runs listed, and first when several do.
KEY_PARAMS = ("normalization", "batch_size", "train_seed", "learning_rate", "num_epochs")
SHORT = {"normalization": "norm", "batch_size": "bs", "train_seed": "seed", "learning_rate": "lr",
         "num_epochs": "epochs", "norm_batch": "norm bs", "num_groups": "G", "data_seed": "data seed"}
# A parent run's own parameters (its base configuration, its search) say nothing of one trial.
_NOT_A_TRIALS = ("base.", "space", "search", "num_trials", "sweep_name", "final_num_epochs", "max_workers")
MOST_PARAMS = 5
VAL_METRICS = (BEST_VAL_ACC, VAL_ACC)
TEST_METRICS = (TEST_ACC,)


def differing_params(records) -> list[str]:
    """The parameters whose values differ among the runs (KEY_PARAMS first, then by name, MOST_PARAMS at
    most); KEY_PARAMS when none does."""
    values: dict[str, set[str]] = {}
    for record in records:
        for key, value in record.params.items():
            if not key.startswith(_NOT_A_TRIALS):
                values.setdefault(key, set()).add(value)
    differing = [k for k in values if len(values[k]) > 1]
    ordered = [k for k in KEY_PARAMS if k in differing] + sorted(k for k in differing if k not in KEY_PARAMS)
    return ordered[:MOST_PARAMS] or list(KEY_PARAMS)


def recent_runs(tracking_uri: str | None, experiments: list[str] | None, limit: int) -> list[dict]:
    """The most recent runs of the store, newest first, as plain rows."""
    from .. import tracking

    store = tracking.connect(tracking_uri, read_only=True)
    names = store.experiment_names(experiments)
    records = store.recent_runs(list(names), limit)
    run_names = {r.id: r.name for r in records}
    for parent in {r.parent_id for r in records} - set(run_names) - {None}:
        try:
            run_names[parent] = store.record(parent).name
        except Exception:  # a deleted parent keeps its id
            pass
    shown = differing_params(records)
    return [{
        "run": r.name,
        "experiment": names[r.experiment_id],
        "parent": run_names.get(r.parent_id, r.parent_id) if r.parent_id else None,
        "status": r.status,
        "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.start_time_ms / 1000)),
        "params": {k: r.params[k] for k in shown if k in r.params},
        "val_acc": next((v for k in VAL_METRICS if (v := read(r.metrics, k)) is not None), None),
        "test_acc": next((v for k in TEST_METRICS if (v := read(r.metrics, k)) is not None), None),
        "run_id": r.id,
    } for r in records]


def _params_text(params: dict) -> str:
    return " ".join(f"{SHORT.get(k, k)}={v}" for k, v in params.items())


def print_runs_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        print("no runs yet")
        return
    # A terminal's own width; a pipe gets every column in full.
    console = Console(width=None if sys.stdout.isatty() else 180)
    cells = {
        "run": lambda r: r["run"],
        "status": lambda r: r["status"],
        "params": lambda r: _params_text(r["params"]),
        "test acc": lambda r: "" if r["test_acc"] is None else f"{r['test_acc']:.3f}",
        "val acc": lambda r: "" if r["val_acc"] is None else f"{r['val_acc']:.3f}",
        "experiment": lambda r: r["experiment"],
        "parent": lambda r: r["parent"] or "",
        "started": lambda r: r["started"],
    }
    # (least, most) width of each column, in the order they are given up when the terminal is narrow: the
    # parameters that tell the runs apart whole, before the run's (long) name is widened.
    needed = max(len(_params_text(r["params"])) for r in rows)
    widths = {"run": (14, 44), "status": (8, 8), "params": (min(needed, 40), 40), "test acc": (8, 8),
              "val acc": (7, 7), "experiment": (10, 18), "parent": (10, 22), "started": (16, 16)}
    room = console.width - 1
    shown = []
    for column, (least, _) in widths.items():  # the columns whose least widths fit
        if sum(widths[c][0] + 2 for c in shown) + least + 2 <= room:
            shown.append(column)
    size = {c: widths[c][0] for c in shown}
    spare = room - sum(size[c] + 2 for c in shown)
    for column in shown:  # then widen them, in order, up to their most
        grow = min(spare, widths[column][1] - size[column])
        size[column] += grow
        spare -= grow
    table = Table(box=None, header_style="bold")
    for column in shown:
        table.add_column(column, justify="right" if column.endswith("acc") else "left", no_wrap=True,
                         overflow="ellipsis", width=size[column])
    for row in rows:
        table.add_row(*(cells[column](row) for column in shown))
    console.print(table)
