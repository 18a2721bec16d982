"""Several KD students of one ensemble, on hand-made runs and predictions: the gains
table gives their mean a seeds × images interval, the one that
stats.hierarchical_bootstrap gives the same correctness, and keeps the paired image
bootstrap where one side is one run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli
from test_properties import SMOKE, Experiment, _Log

from kd_mlflow import compare, config, schema, stats
from kd_mlflow import gains as gains_mod


def _kd_study(kd_seeds=(100, 101, 102)) -> Experiment:
    """Two single models, their ensemble, its KD students and two SD students."""
    log = _Log()
    t0, t1 = (log.add("train", SMOKE, 11 + s, seed=s, group="g0", config_hash=f"g0-{s}") for s in range(2))
    ens = log.add(
        "ensemble",
        SMOKE,
        21,
        member_role="train",
        member_run_ids=(t0.run_id, t1.run_id),
        member_seeds=("0", "1"),
        combine="prob",
        group="e-prob-g0",
        config_hash="ens",
        params={"combine": "prob"},
    )
    student = SMOKE.replace(**{k: getattr(SMOKE, k) for k in config.STUDENT_FIELDS})
    for method, teachers, seeds in (("kd", [ens] * len(kd_seeds), kd_seeds), ("sd", [t0, t1], (10, 11))):
        for teacher, seed in zip(teachers, seeds, strict=True):
            log.add(
                "student",
                student,
                seed,
                method=method,
                seed=seed,
                teacher_run_id=teacher.run_id,
                teacher_seeds=",".join(teacher.member_seeds) or str(teacher.seed),
                generation=1,
                group=f"s-{method}",
                config_hash=f"{method}-{seed}",
            )
    return Experiment(tuple(log.records), log.correct)


def _tables(exp: Experiment):
    (t,) = compare.build_tables(exp.frame(), predictions=exp.predictions())
    return t


def _correct(exp: Experiment, run_ids) -> np.ndarray:
    return np.stack([np.array(exp.correct[r]) for r in run_ids])


def test_the_mean_of_several_kd_students_has_the_seeds_and_images_interval():
    exp = _kd_study()
    t = _tables(exp)
    gains = t.gains.set_index("gain")
    row = gains.loc[gains_mod.KD_MEAN]
    kd, singles = list(t.kd["run_id"]), list(t.seeds["run_id"])
    want = stats.hierarchical_bootstrap(
        _correct(exp, singles), _correct(exp, kd), paired=False, scale=100.0, n_resamples=10_000, seed=0
    )
    assert row["interval"] == gains_mod.SEEDS_AND_IMAGES
    assert (row["lo"], row["hi"]) == pytest.approx((want.lo, want.hi))
    assert row["estimate"] == pytest.approx(t.kd["test_acc"].mean() - t.seeds["test_acc"].mean())
    per_seed = t.kd["test_acc"].to_numpy() - t.seeds["test_acc"].mean()
    over_seeds = stats.seed_interval(per_seed)
    assert (row["seed_lo"], row["seed_hi"]) == pytest.approx((over_seeds.lo, over_seeds.hi))
    summary = t.summary.set_index("row")
    assert summary.loc["KD students", "n"] == 3


def test_sd_pairs_are_resampled_together_and_one_run_keeps_the_image_bootstrap():
    exp = _kd_study()
    t = _tables(exp)
    gains = t.gains.set_index("gain")
    sd = t.self_distillation
    pairs = gains.loc["SD - teacher (mean over pairs)"]
    want = stats.hierarchical_bootstrap(
        _correct(exp, sd["teacher_run_id"]), _correct(exp, sd["run_id"]), paired=True, scale=100.0
    )
    assert pairs["interval"] == gains_mod.SEEDS_AND_IMAGES
    assert (pairs["lo"], pairs["hi"]) == pytest.approx((want.lo, want.hi))
    ens = gains.loc["ensemble - mean single"]
    images = stats.paired_bootstrap(_correct(exp, t.seeds["run_id"]), _correct(exp, t.ensembles["run_id"]))
    assert ens["interval"] == gains_mod.IMAGES
    assert (ens["lo"], ens["hi"]) == pytest.approx((images.lo, images.hi))
    assert set(gains.loc[gains.index.str.startswith("KD student "), "interval"]) == {gains_mod.IMAGES}


def test_figure1_gives_the_kd_students_a_t_interval_over_their_seeds():
    t = _tables(_kd_study())
    kd = t.figure1.set_index("column").loc["kd"]
    want = stats.seed_interval(t.kd["test_acc"].to_numpy())
    assert kd["n"] == 3 and (kd["seed_lo"], kd["seed_hi"]) == pytest.approx((want.lo, want.hi))
    assert "seeds × images" in compare.render([t], "markdown")


def test_one_kd_student_has_no_mean_row():
    t = _tables(_kd_study(kd_seeds=(100,)))
    assert gains_mod.KD_MEAN not in set(t.gains["gain"]) and "KD - mean single" in set(t.gains["gain"])


@pytest.mark.e2e
def test_a_study_with_three_kd_seeds_shows_their_mean_and_a_rerun_trains_nothing(tracked):
    """`reproduce --kd-seeds 100-102` (smoke, two teacher seeds, one epoch, as a process):
    three KD students of the one ensemble; compare's KD row has n = 3, their std and a t
    interval over the seeds; the parent's kd_test_acc is their mean; a rerun reuses all."""
    args = ("reproduce", "--preset", "smoke", "--seeds", "0-1", "--epochs", "1", "--kd-seeds", "100-102")
    first = run_cli(*args, "--no-register", env=tracked.env)
    assert first.returncode == 0, first.stderr[-3000:]
    by_name = {r.info.run_name: r for r in tracked.runs()}
    kd = [by_name[f"kd-seed-{s}"] for s in (100, 101, 102)]
    assert {r.data.tags[schema.TEACHER_RUN_ID] for r in kd} == {by_name["ensemble-seeds-0-1"].info.run_id}
    accs = np.array([r.data.metrics[schema.FINAL_TEST_ACC] for r in kd])
    doc = json.loads(run_cli("compare", "--format", "json", env=tracked.env).stdout)
    row = next(r for r in doc["summary"] if r["row"] == "KD students")
    assert row["n"] == 3 and row["test_std"] == pytest.approx(accs.std(ddof=1))
    column = next(r for r in doc["figure1"] if r["column"] == "kd")
    want = stats.seed_interval(accs)
    assert (column["seed_lo"], column["seed_hi"]) == pytest.approx((want.lo, want.hi))
    parent = next(r for n, r in by_name.items() if n.startswith("study-"))
    assert parent.data.metrics["kd_test_acc"] == pytest.approx(accs.mean())
    again = run_cli(*args, "--no-register", env=tracked.env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 step(s) ran" in again.stderr


def test_the_waves_hold_one_kd_step_per_seed_and_the_students_network_alone():
    """Planned, not run: three KD students of the one ensemble; with a KD student of
    another architecture, that network trained alone on each teacher seed, by a command
    line (--jobs) that trains exactly it."""
    from test_joint import _Recorded

    from kd_mlflow import steps, study

    plan = study.Plan("smoke", config.preset("smoke"), {}, [0, 1], kd_seeds=(100, 101, 102), student_model="resnet8")
    ctx = study.Context(plan, steps.Execution(), "parent")
    executor = _Recorded()
    study._waves(plan, ctx, executor, study.StudyResult("parent"), study.Progress(plan.n_steps, plan.n_trainings))
    assert sum(len(w) for w in executor.waves) == plan.n_steps == 2 + 1 + 3 + 2 + 1 + 2
    (kd_wave,) = [w for w in executor.waves if isinstance(w[0], study.DistillStep) and w[0].method == "kd"]
    assert [s.seed for s in kd_wave] == [100, 101, 102] and len({s.teacher for s in kd_wave}) == 1
    alone = executor.waves[-1]
    assert [s.name for s in alone] == ["train-seed-0-model=resnet8-width=64", "train-seed-1-model=resnet8-width=64"]
    (again,), where = study.Context.from_json(ctx.to_json([alone[1]]))  # as `kd-mlflow _step` reads it
    assert again == alone[1] and again.recipe(where) == alone[1].recipe(ctx)
    assert alone[1].recipe(ctx) == plan.recipe.replace(model="resnet8", width=64)
    same = study.Plan("smoke", config.preset("smoke"), {}, [0, 1], kd_seeds=(100,))
    assert not same.alone and same.n_steps == 7  # a study of one architecture: the steps it had


@pytest.mark.parametrize("given", [["--kd-seed", "7"], ["--kd_seeds", "7"], ["--kd-seeds", "7"]])
def test_kd_seed_is_the_one_seed_spelling_of_kd_seeds(given):
    from kd_mlflow import cli

    assert cli.main.commands["reproduce"].make_context("reproduce", given).params["kd_seeds"] == "7"


@pytest.mark.parametrize("bad", ["100,100", "x"])
def test_bad_kd_seeds_are_refused_with_exit_2(tracked, bad):
    proc = run_cli("reproduce", "--preset", "smoke", "--kd-seeds", bad, env=tracked.env)
    assert proc.returncode == 2 and "kd_seeds" in proc.stderr and "Traceback" not in proc.stderr
    assert tracked.runs() == []


def test_the_calibration_notes_name_the_runs_whose_nll_is_floored():
    """Predictions without float32 log-probabilities (files before format 3, as these
    hand-made ones are): their NLL is floored, and the notes say which runs."""
    exp = _kd_study(kd_seeds=(100,))
    t = _tables(exp)
    (note,) = [n for n in t.notes if n.startswith("calibration:")]
    counted = {r for ids in t.calibration["run_ids"] for r in ids}
    assert f"the NLL of {len(counted)} run(s)" in note and sorted(counted)[0] in note
