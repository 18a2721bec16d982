"""The view MLflow's UI opens a study on: its runs grouped by recipe and role, the seeds
of a group aggregated (mean, with the min-max band) in the charts of the epochs'
curves, the result metrics as columns, best test accuracy first.

MLflow's experiment page (3.x) reads a shared view from an experiment tag: the link's
``?viewStateShareKey=KEY`` loads the experiment tag of that key (written by
:func:`kd_mlflow.tracking.share_view`), a JSON object of the
page's search facets (sort, filter) and UI state (columns, grouping, charts). The keys
and formats here are those of MLflow 3.17's UI (its bundle in mlflow/server/js: the
shared-view reader picks the facet keys and the UI-state keys below and drops the rest).
"""

from __future__ import annotations

import json

from . import schema, tracking

SHARE_KEY = "kd-mlflow-study"  # one view per experiment: a study's runs share its experiment
GROUP_BY = (schema.GROUP_LABEL, schema.ROLE)  # the recipe in words, then train | student | ...
COLUMNS = (schema.FINAL_VAL_ACC, schema.FINAL_TEST_ACC, "test_nll", "test_ece")
CHARTS = ("val_acc", "test_acc", "train_loss")
SORT_BY = schema.FINAL_TEST_ACC
SECTION = "kd-mlflow-study"  # the charts' section, shown first


def column(kind: str, key: str) -> str:
    """A column's key as the UI writes it: metrics.`final_test_acc`."""
    return f"{kind}.`{key}`"


def _line_chart(metric: str) -> dict:
    """A line chart of one metric over epochs (the UI's RunsChartsLineCardConfig)."""
    return {
        "uuid": f"kd-{metric}",
        "type": "LINE",
        "metricSectionId": SECTION,
        "deleted": False,
        "isGenerated": False,
        "displayName": metric,
        "metricKey": metric,
        "selectedMetricKeys": [metric],
        "xAxisKey": "step",
        "xAxisScaleType": "linear",
        "scaleType": "linear",
        "yAxisKey": "metric",
        "yAxisExpressions": [],
        "lineSmoothness": 0,
        "ignoreOutliers": False,
        "useGlobalXaxisKey": True,
        "useGlobalLineSmoothing": True,
        "runsCountToCompare": 10,
    }


def state() -> dict:
    """The shared view: plain data, the same for every study."""
    return {
        # search facets
        "orderByKey": column("metrics", SORT_BY),
        "orderByAsc": False,
        # UI state
        "selectedColumns": [column("metrics", key) for key in COLUMNS],
        "groupBy": {
            "aggregateFunction": "average",
            "groupByKeys": [{"mode": "tag", "groupByData": key} for key in GROUP_BY],
        },
        "useGroupedValuesInCharts": True,
        "runsHiddenMode": "SHOW_ALL",  # every group in the charts, not the first 10
        "compareRunCharts": [_line_chart(metric) for metric in CHARTS],
        "compareRunSections": [
            {"uuid": SECTION, "name": "Study", "display": True, "isReordered": False, "deleted": False}
        ],
        "hideEmptyCharts": True,
    }


def encoded() -> str:
    return json.dumps(state(), separators=(",", ":"))


def link(session) -> str:
    """The experiment's runs in the view (charts first), where it could be saved; else the
    experiment's runs as they are (a user who may only read, a server away: the view is a
    convenience, never a reason to fail)."""
    if not tracking.share_view(session, SHARE_KEY, encoded()):
        return tracking.experiment_link(session)
    return f"{tracking.experiment_link(session)}&viewStateShareKey={SHARE_KEY}&compareRunsMode=CHART"
