"""Saved views of an experiment's runs page in MLflow's UI: one run's children, grouped and charted.

MLflow 3.17's runs page keeps named views in experiment tags ``mlflow.sharedViewState.<key>``
(its "Share" button writes them): an envelope ``{name, createdAt, updatedAt, state}`` whose
state is the page's search and layout as JSON. ``#/experiments/<id>/runs?viewStateShareKey=<key>``
opens the view, and the page's view menu lists it by name. A view written here shows one
sweep's trials and nothing else (its search keeps the runs whose parent is the sweep's
run; other sweeps, a pipeline's final training and the sweep's own numbers stay out of its
charts), grouped (by normalization), with the charts given first, each group drawn as its
mean with a band from its lowest to its highest run.

The state's keys are the UI's own (searchFilter, groupBy, compareRunCharts, ...), checked
against MLflow 3.17.2 in a browser (docs/screenshots.py draws one); a UI that does not know
them opens the runs page as it would without the view.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from .names import MLFLOW_PARENT_RUN_ID
from .patience import patient
from .run import Run

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
# Enough for every trial of a sweep, or group of them, to be drawn (the UI's default is the first 10).
RUNS_DRAWN = 500


@dataclass(frozen=True)
class LineChart:
    """y_metric against x_metric (a metric each run logged once, e.g. batch_size): one line per group."""

    y_metric: str
    x_metric: str
    title: str
    y_range: tuple[float, float] | None = None  # the axis the UI would start at 0 otherwise


@dataclass(frozen=True)
class BarChart:
    """metric, one bar per group (its mean)."""

    metric: str
    title: str


def in_page(url: str) -> str:
    """A link to an MLflow UI page made relative ("#/experiments/..."): within the UI (a run's description), it
    works on whatever host and port the UI is served."""
    return "#" + url.partition("#")[2]


def view_key(parent: Run) -> str:
    """The view of parent's children: one per parent run, rewritten when the run is (a resumed sweep)."""
    return f"trials-{parent.id}"


@patient
def save_children_view(parent: Run, name: str, group_by: list[str], charts: list[LineChart | BarChart],
                       section: str, collapsed: tuple[str, ...] = ()) -> str:
    """Write the saved view of parent's child runs, grouped by the parameters group_by (mean per group), with
    charts in a first section of that title and the metric sections named in collapsed folded. Returns the
    UI page that opens it in the chart view ("experiments/<id>/runs?viewStateShareKey=...&compareRunsMode=CHART";
    Store.ui_url makes a link of it)."""
    key = view_key(parent)
    first = f"{key}-charts"
    state = {
        "searchFilter": f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.id}'",
        "orderByKey": "attributes.start_time", "orderByAsc": True,
        "groupBy": {"aggregateFunction": "average",
                    "groupByKeys": [{"mode": "param", "groupByData": name_} for name_ in group_by]},
        "runsHiddenMode": "SHOW_ALL", "hideEmptyCharts": True, "useGroupedValuesInCharts": True,
        "isAccordionReordered": True,  # the sections in the order given, not sorted by name
        "compareRunSections": [{"uuid": first, "name": section, "display": True, "isReordered": True},
                               *({"uuid": f"{key}-{title}", "name": title, "display": False, "isReordered": False}
                                 for title in collapsed)],
        "compareRunCharts": [_chart(chart, f"{key}-{i}", first) for i, chart in enumerate(charts)],
    }
    now = int(time.time() * 1000)
    envelope = {"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    parent.store.client.set_experiment_tag(parent.experiment_id, VIEW_TAG_PREFIX + key, json.dumps(envelope))
    return f"experiments/{parent.experiment_id}/runs?viewStateShareKey={key}&compareRunsMode=CHART"


def _chart(chart: LineChart | BarChart, uuid: str, section: str) -> dict:
    common = {"uuid": uuid, "metricSectionId": section, "deleted": False, "isGenerated": False,
              "runsCountToCompare": RUNS_DRAWN, "displayName": chart.title}
    if isinstance(chart, BarChart):
        return {**common, "type": "BAR", "metricKey": chart.metric, "selectedMetricKeys": [chart.metric]}
    low, high = chart.y_range or (None, None)
    return {**common, "type": "LINE", "metricKey": chart.y_metric, "selectedMetricKeys": [chart.y_metric],
            "xAxisKey": "metric", "selectedXAxisMetricKey": chart.x_metric, "xAxisScaleType": "linear",
            "scaleType": "linear", "useGlobalXaxisKey": False, "useGlobalLineSmoothing": False, "lineSmoothness": 0,
            "displayPoints": True, "range": {"xMin": None, "xMax": None, "yMin": low, "yMax": high}}
