"""`cnnflow runs`: the most recent MLflow runs as a table (or JSON), read through flows.tracking."""

from __future__ import annotations

import sys
import time

from ..metrics import BEST_VAL_ACC, TEST_ACC, VAL_ACC, read

# Shown by `cnnflow runs`, where a run has them, under these short names.
KEY_PARAMS = {"normalization": "norm", "batch_size": "bs", "learning_rate": "lr", "num_epochs": "epochs"}
VAL_METRICS = (BEST_VAL_ACC, VAL_ACC)
TEST_METRICS = (TEST_ACC,)


def recent_runs(tracking_uri: str | None, experiments: list[str] | None, limit: int) -> list[dict]:
    """The most recent runs of the store, newest first, as plain rows."""
    from .. import tracking

    store = tracking.connect(tracking_uri)
    names = store.experiment_names(experiments)
    records = store.recent_runs(list(names), limit)
    run_names = {r.id: r.name for r in records}
    for parent in {r.parent_id for r in records} - set(run_names) - {None}:
        try:
            run_names[parent] = store.record(parent).name
        except Exception:  # a deleted parent keeps its id
            pass
    return [{
        "run": r.name,
        "experiment": names[r.experiment_id],
        "parent": run_names.get(r.parent_id, r.parent_id) if r.parent_id else None,
        "status": r.status,
        "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.start_time_ms / 1000)),
        "params": {k: r.params[k] for k in KEY_PARAMS if k in r.params},
        "val_acc": next((v for k in VAL_METRICS if (v := read(r.metrics, k)) is not None), None),
        "test_acc": next((v for k in TEST_METRICS if (v := read(r.metrics, k)) is not None), None),
        "run_id": r.id,
    } for r in records]


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
        "val acc": lambda r: "" if r["val_acc"] is None else f"{r['val_acc']:.3f}",
        "test acc": lambda r: "" if r["test_acc"] is None else f"{r['test_acc']:.3f}",
        "params": lambda r: " ".join(f"{KEY_PARAMS[k]}={v}" for k, v in r["params"].items()),
        "experiment": lambda r: r["experiment"],
        "parent": lambda r: r["parent"] or "",
        "started": lambda r: r["started"],
    }
    # (least, most) width of each column, in the order they are given up when the terminal is narrow.
    widths = {"run": (16, 40), "status": (8, 8), "val acc": (7, 7), "test acc": (8, 8), "params": (16, 40),
              "experiment": (10, 18), "parent": (10, 22), "started": (16, 16)}
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
