"""`cnnflow report NAME`: a study's report, from the parent run of the sweep that made it.

The report, its figures and its tables are artifacts of the sweep's parent run
(study/); this prints the report and, with a folder, copies them there, as the
reports under docs/studies/ were made.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .errors import CliError

KEPT = (".md", ".png", ".csv")  # the MLflow-table copies (.json) of the CSVs stay in MLflow


def find_study(tracking_uri: str | None, name: str, experiments: list[str] | None):
    """The most recent parent run of the sweep called name that holds a study report."""
    from .. import tracking

    store = tracking.connect(tracking_uri)
    ids = list(store.experiment_names(experiments)) if experiments else None
    record = store.latest_run({"sweep_name": name, "sweep_role": "parent"}, ids)
    if record is None:
        raise CliError(f"no sweep named {name!r} in {store.shown}; `cnnflow runs` lists the runs there")
    return store.run_of(record), record


def export_study(run, dest: Path | None) -> str:
    """The report's text; with dest, the report, figures and tables copied into it. Returns the report."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = run.download("study", tmp)
        except Exception as exc:  # an artifact store without the folder: a sweep that was not a study
            raise CliError(f"run {run.id} holds no study report (study/report.md): {exc}") from exc
        report = folder / "report.md"
        if not report.exists():
            raise CliError(f"run {run.id} holds no study report (study/report.md)")
        if dest is not None:
            dest.mkdir(parents=True, exist_ok=True)
            for path in sorted(folder.iterdir()):
                if path.suffix in KEPT:
                    shutil.copy2(path, dest / path.name)
        return report.read_text()
