"""The read path: the report's tables from the finished runs (``compare``), and the
predictions they need, computed once from a run's weights where a run made before
predictions were logged has none. :mod:`kd_mlflow.steps` is the write path.

torch is imported only where old runs' predictions must be computed, so that
``compare`` starts without it.
"""

from __future__ import annotations

import dataclasses
import sys

from . import runs, steps
from .config import ConfigError
from .runs import RunRecord


def compare(
    experiment: str | None,
    fmt: str,
    *,
    preset: str | None = None,
    dataset: str | None = None,
    group: str | None = None,
    intervals: bool = True,
) -> str:
    """The report's tables from the experiment's finished runs, rendered as ``fmt``;
    with ``intervals``, every gain's uncertainty and the mechanism figures, from the
    runs' logged predictions."""
    from . import compare as tables

    session = runs.connect(experiment, create=False)
    built = tables.build_tables(runs.results_frame(session, preset), preset, dataset, group)
    if intervals and built:
        preds = predictions_for(session, tables.run_ids(built))
        built = [tables.with_intervals(t, preds) for t in built]
    if not built:
        elsewhere = runs.experiments_with_results(session)
        if elsewhere:
            print(
                f"note: no kd-mlflow results in this experiment; found some in: {', '.join(elsewhere)} "
                f"(pass --experiment NAME)",
                file=sys.stderr,
            )
    text = tables.render(built, fmt)
    if session.adopted_run_id:
        # Under `mlflow run -e compare`: the tables and plot are that run's artifacts.
        from . import plots

        figs = {"accuracy_by_method.png": plots.accuracy_by_method(built)}
        runs.log_tables(
            session,
            session.adopted_run_id,
            {
                f"tables.{ext}": tables.render(built, f)
                for f, ext in (("markdown", "md"), ("json", "json"), ("csv", "csv"))
            },
            figs,
        )
        plots.close(figs)
    return text


def predictions_for(session, run_ids) -> dict:
    """run id -> its logged predictions. A run made before runs logged them gets them
    from its logged weights, once, and they are logged on it then; a run without
    weights gets none (its gains have no interval)."""
    out = {}
    for rid in run_ids:
        rec = runs.get(session, rid, "run")
        if not rec.has_predictions:
            try:
                steps.check_loadable(session, rec, "run")
                _backfill_predictions(session, rec)
            except ConfigError as e:
                print(f"note: no predictions for run {rid}: {e.reason}", file=sys.stderr)
                continue
            rec = dataclasses.replace(rec, has_predictions=True)
        out[rid] = runs.predictions_of(session, rec)
    return out


def _backfill_predictions(session, rec: RunRecord) -> None:
    from . import data as data_mod
    from .train import make_runtime, predict

    print(f"computing the predictions of run {rec.run_id} ({rec.name}) from its weights, once", file=sys.stderr)
    member = runs.members(session, rec)[0] if rec.role == "ensemble" else rec
    recipe = member.recipe
    source, split = steps.load_data(recipe, rec.data_dir or member.data_dir, steps.Execution())
    runs.check_same_data(rec, split.digest, source.num_classes, "run")
    rt = make_runtime(recipe, "cpu")
    model = steps.load_network(session, rec, source.num_classes, "run")
    dd = data_mod.DeviceData(source, split, rt.device)
    probs_val, pred_val = predict(model, dd, "val", recipe, rt)
    probs_test, pred_test = predict(model, dd, "test", recipe, rt)
    runs.add_predictions(
        session,
        rec,
        probs_val.numpy(),
        probs_test.numpy(),
        dd.val_y.numpy(),
        dd.test_y.numpy(),
        pred_val=pred_val.numpy(),
        pred_test=pred_test.numpy(),
    )
