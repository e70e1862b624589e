"""`cnnflow report NAME`: a study's report, from the parent run of the sweep that made it.

The report, its figures and its tables are artifacts of the sweep's parent run
(study/); this prints the report and, with a folder, copies them there, as the
reports under docs/studies/ were made. To a terminal it prints the answer (the
report's title and its answer section, drawn as the terminal can); to a pipe or a
file, or with --format md, the whole markdown.
"""

from __future__ import annotations

import io
import re
import shutil
import tempfile
from pathlib import Path

from .errors import CliError

KEPT = (".md", ".png", ".csv")  # the MLflow-table copies (.json) of the CSVs stay in MLflow
REPORT = "study/report.md"
# How many of the most recent sweeps are looked through for study reports, to name them when NAME is not one.
STUDIES_LISTED_FROM = 30


def find_study(tracking_uri: str | None, name: str, experiments: list[str] | None):
    """The most recent parent run of the sweep called name that holds a study report, and its record; a
    CliError naming the studies the store has when there is none of that name."""
    from .. import tracking
    from ..config import SweepSpec

    pattern = next(m.pattern for m in SweepSpec.model_fields["name"].metadata if getattr(m, "pattern", None))
    if not re.fullmatch(pattern, name):
        raise CliError(f"{name!r} is not a sweep name (letters, digits, '_', '.' and '-', starting with a letter "
                       "or a digit); `cnnflow runs` lists the runs and their sweeps", 2)
    store = tracking.connect(tracking_uri, read_only=True)
    ids = list(store.experiment_names(experiments)) if experiments else None
    record = store.latest_run({"sweep_name": name, "sweep_role": "parent"}, ids)
    if record is None:
        raise CliError(f"no sweep named {name!r} in {store.shown}. {_studies_there(store, ids)}")
    return store.run_of(record), record


def _studies_there(store, experiment_ids: list[str] | None) -> str:
    """A sentence naming the studies (sweeps with a study report) among the store's recent sweeps."""
    names = known_studies(store, experiment_ids)
    if not names:
        return ("It holds no study report: `cnnflow run sweep --preset bn-vs-gn-small` makes one; "
                "`cnnflow runs` lists the runs there.")
    return f"Studies there, newest first: {', '.join(names)}."


def known_studies(store, experiment_ids: list[str] | None, limit: int = STUDIES_LISTED_FROM) -> list[str]:
    """The names of the sweeps, among the store's `limit` most recent, whose parent run holds a study report."""
    ids = experiment_ids or list(store.experiment_names())
    parents = store._search(ids, "tags.`sweep_role` = 'parent'", ["attributes.start_time DESC"])[:limit] if ids else []
    names = []
    with tempfile.TemporaryDirectory() as tmp:
        for record in parents:
            name = record.tags.get("sweep_name") or record.name
            if name in names:
                continue
            try:
                store.run_of(record).download(REPORT, Path(tmp) / record.id)
            except Exception:  # no report: a grid or a random search, not a study
                continue
            names.append(name)
    return names


def export_study(run, dest: Path | None) -> str:
    """The report's text; with dest, the report, figures and tables copied into it. Returns the report."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = run.download("study", tmp)
        except Exception as exc:  # an artifact store without the folder: a sweep that was not a study
            raise CliError(f"run {run.id} holds no study report ({REPORT}): {exc}") from exc
        report = folder / "report.md"
        if not report.exists():
            raise CliError(f"run {run.id} holds no study report ({REPORT})")
        if dest is not None:
            dest.mkdir(parents=True, exist_ok=True)
            for path in sorted(folder.iterdir()):
                if path.suffix in KEPT:
                    shutil.copy2(path, dest / path.name)
        return report.read_text()


def answer_section(markdown: str) -> str:
    """The report's title and its answer: the section whose heading names the answer, else its first section."""
    title, *sections = re.split(r"(?m)^(?=## )", markdown)
    title = "\n".join(line for line in title.splitlines() if line.startswith("# "))
    chosen = next((s for s in sections if "answer" in s.splitlines()[0].lower()), sections[0] if sections else "")
    return f"{title}\n\n{chosen.strip()}"


def for_terminal(markdown: str, width: int) -> str:
    """Markdown drawn for a terminal width columns wide: headings, tables and emphasis, no markup; a figure
    as its file's name (`--to DIR` writes it)."""
    from rich.console import Console
    from rich.markdown import Markdown

    markdown = re.sub(r"!\[([^\]]*)\]\(([^)]*)\)", r"(figure: \1, \2)", markdown)
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    console.print(Markdown(markdown))
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())
