"""The read path: the report's tables from the finished runs (``compare``), which
never writes to a run; and ``backfill``, asked for by name, which computes what a run
made before runs logged them lacks (predictions from its weights, calibration metrics)
and logs it on the run. :mod:`kd_mlflow.steps` is the write path.

torch is imported only where old runs' predictions must be computed (backfill), so
that ``compare`` starts without it.
"""

from __future__ import annotations

import dataclasses
import sys

from . import runs, steps, tracking
from .calibration import measure
from .config import ConfigError
from .runs import RunRecord


def compare(
    experiment: str | None,
    fmt: str,
    *,
    table: str | None = None,
    every: bool = False,
    preset: str | None = None,
    dataset: str | None = None,
    group: str | None = None,
    intervals: bool = True,
) -> dict:
    """The report's tables from the experiment's finished runs, rendered as ``fmt``:
    {table name: text}, one entry (``table``: the CSV table it names, the per-run one by
    default) or, with ``every``, one per CSV table. With ``intervals``, every gain's
    uncertainty and the mechanism figures, from the runs' logged predictions."""
    from . import compare as tables
    from .tables import CSV_TABLES

    session = tracking.connect(experiment, create=False)
    built = tables.build_tables(runs.results_frame(session, preset), preset, dataset, group)
    if built:
        recs = [runs.get(session, rid, "run") for rid in tables.run_ids(built)]
        _note_lacking(session, recs)
        if intervals:
            preds = _logged_predictions(session, recs)
            built = [tables.with_intervals(t, preds) for t in built]
    if not built:
        _nothing_matched(session, tables, preset=preset, dataset=dataset, group=group)
    texts = {name: tables.render(built, fmt, name) for name in (CSV_TABLES if every else (table,))}
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
    return texts


def _nothing_matched(session, tables, *, preset, dataset, group) -> None:
    """No table: a filter that matched nothing is refused, naming what is there (exit 2);
    an experiment without results says where results are, if anywhere (exit 0, empty
    tables: nothing yet is an answer)."""
    here = tables.build_tables(runs.results_frame(session)) if (preset or dataset or group) else []
    name = tracking.experiment_name(session)
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
    """run id -> its logged predictions, for the runs that have them. A pure read: a run
    made before runs logged them has none here (its gains have no interval) until
    ``kd-mlflow backfill`` adds them."""
    return _logged_predictions(session, [runs.get(session, rid, "run") for rid in run_ids])


def _logged_predictions(session, recs: list[RunRecord]) -> dict:
    return {r.run_id: runs.predictions_of(session, r) for r in recs if r.has_predictions}


def _note_lacking(session, recs: list[RunRecord]) -> None:
    """One note, however many runs: which lack predictions or calibration metrics, and
    the command that adds them (compare itself never writes to a run)."""
    parts = []
    for what, ids in (
        ("predictions (their gains have no interval)", [r.run_id for r in recs if not r.has_predictions]),
        ("calibration metrics", [r.run_id for r in recs if not r.has_calibration]),
    ):
        if ids:
            shown = ", ".join(i[:8] for i in ids[:6]) + (", ..." if len(ids) > 6 else "")
            parts.append(f"{len(ids)} run(s) lack {what}: {shown}")
    if parts:
        name = tracking.experiment_name(session)
        print(
            f"note: {'; '.join(parts)}; `kd-mlflow backfill --experiment {name}` adds them (needs write access)",
            file=sys.stderr,
        )


def backfill(experiment: str | None) -> list[str]:
    """What compare's runs lack, computed and logged on each run once: predictions from
    its logged weights, calibration metrics from its predictions. One line per run that
    got something; none when every run has both (a second backfill adds nothing)."""
    from . import compare as tables

    session = tracking.connect(experiment, create=False)
    return backfill_runs(session, tables.run_ids(tables.build_tables(runs.results_frame(session))))


def backfill_runs(session, run_ids) -> list[str]:
    lines = []
    for rid in run_ids:
        rec = runs.get(session, rid, "run")
        added = _backfill_run(session, rec)
        if added:
            lines.append(f"run {rid} ({rec.name}): added {' and '.join(added)}")
    return lines


def _backfill_run(session, rec: RunRecord) -> list[str]:
    added: list[str] = []
    if not rec.has_predictions:
        try:
            steps.check_loadable(session, rec, "run")
            _backfill_predictions(session, rec)
        except ConfigError as e:  # no weights, or not its data: nothing to add, said once per backfill
            print(f"note: run {rec.run_id} cannot have predictions: {e.reason}", file=sys.stderr)
            return added
        rec = dataclasses.replace(rec, has_predictions=True)
        added.append("predictions")
    if not rec.has_calibration:
        p = runs.predictions_of(session, rec)
        runs.add_calibration(session, rec, measure(p.probs(), p.labels(), p.top1()).as_metrics())
        added.append("calibration metrics")
    return added


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
