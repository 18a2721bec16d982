"""The shared server under load, short: benchmarks/load.py's writers (kd-mlflow's own
tracking code, shaped like trainings) against the PostgreSQL + basic-auth stack, the
server SIGKILLed and restarted once mid-load. Nothing lost, nothing doubled, every
writer finishes. Skips, saying why, where PostgreSQL cannot be started (as
test_stack.py does). The full benchmark: `python benchmarks/run.py --only load`."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import load

# Short: 8 writers of 5 epochs; one server worker, not four: a restart costs a worker's
# start (each imports MLflow), 30 s and more for two on a busy 2-core machine.
SHAPE = load.Shape(writers=8, epochs=5, epoch_seconds=1.0, model_mb=1.0, predictions=500, deadline=150, workers=1)


@pytest.fixture(scope="module")
def restarted_once(tmp_path_factory):
    reason = load.unavailable_reason()
    if reason:
        pytest.skip(reason)
    return load.scenario("server-restart", SHAPE, tmp_path_factory.mktemp("load"), faults=("server", (1 / 2,)))


def test_a_server_killed_mid_load_loses_and_doubles_nothing(restarted_once):
    fig = restarted_once
    print(f"\n{load.table([fig])}")
    assert [f.get("skipped") for f in fig["faults"]] == [None], fig["faults"]  # the restart happened mid-load
    assert fig["load_lost_epochs"] == 0
    assert fig["load_duplicated_epochs"] == 0
    assert fig["orphan_runs"] == 0
    assert fig["all_finished"], fig["writer_errors"]
    assert fig["log_batch_samples"] == SHAPE.writers * SHAPE.epochs  # each epoch delivered once
