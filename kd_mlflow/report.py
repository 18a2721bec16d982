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
from .calibration import measure
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
        _nothing_matched(session, tables, preset=preset, dataset=dataset, group=group)
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


def _nothing_matched(session, tables, *, preset, dataset, group) -> None:
    """No table: a filter that matched nothing is refused, naming what is there (exit 2);
    an experiment without results says where results are, if anywhere (exit 0, empty
    tables: nothing yet is an answer)."""
    here = tables.build_tables(runs.results_frame(session)) if (preset or dataset or group) else []
    name = runs.experiment_name(session)
    if here:
        for option, value, values in (
            ("preset", preset, sorted({t.preset for t in here})),
            ("dataset", dataset, sorted({t.dataset for t in here})),
        ):
            if value is not None and value not in values:
                there = f"{option}s with results in {name!r}: {', '.join(values)}"
                raise ConfigError(option, value, f"no {option} matches; {there}")
        kept = [t for t in here if (preset is None or t.preset == preset) and (dataset is None or t.dataset == dataset)]
        if not kept:
            of_preset = sorted({t.dataset for t in here if t.preset == preset})
            there = f"{preset} has results on: {', '.join(of_preset)}"
            raise ConfigError("dataset", dataset, f"no {preset} results on it; {there}")
        labels = "; ".join(f"{t.label} ({t.group_id[:8]})" for t in kept[:8]) + ("; ..." if len(kept) > 8 else "")
        raise ConfigError("group", group, f"no group matches {group!r}; groups here: {labels}")
    elsewhere = runs.experiments_with_results(session)
    where = f"; found some in: {', '.join(elsewhere)} (pass --experiment NAME)" if elsewhere else ""
    print(f"note: no kd-mlflow results in experiment {name!r}{where}", file=sys.stderr)


def predictions_for(session, run_ids) -> dict:
    """run id -> its logged predictions. A run made before runs logged them gets them
    from its logged weights, once, and they are logged on it then; a run without
    weights gets none (its gains have no interval). Likewise a run made before runs
    logged their calibration gets it from its predictions, logged on it once."""
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
        if not rec.has_calibration and out[rid] is not None:
            p = out[rid]
            runs.add_calibration(session, rec, measure(p.probs(), p.labels(), p.top1()).as_metrics())
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
