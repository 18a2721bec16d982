"""Every command's options with bad values: exit code 2, one line naming the parameter,
no traceback, and no run created."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import mlflow
import pytest
from conftest import invoke, mlflow_run, run_cli

from kd_mlflow import config, schema

SMOKE = ["--preset", "smoke"]


def _crafted_run(client, exp_id, status="FINISHED", digest="fefd3e72acefba38"):
    """A run that looks like a kd-mlflow result, without training one."""
    from mlflow.entities import Param

    run = client.create_run(
        exp_id,
        tags={
            schema.ROLE: "train",
            schema.PRESET: "smoke",
            schema.DATASET: "digits",
            schema.SEED: "0",
            schema.SPLIT_DIGEST: digest,
            schema.NUM_CLASSES: "10",
        },
    )
    params = [Param(k, v) for k, v in config.preset("smoke").as_params().items()]
    client.log_batch(run.info.run_id, params=params)
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture(scope="module")
def crafted(server, cache_dir):
    """One experiment for the whole table, holding runs that the cases point at."""
    name = f"bad-input-{uuid.uuid4().hex[:8]}"
    client = mlflow.MlflowClient(server.uri)
    exp_id = client.create_experiment(name)
    ids = {
        "running": _crafted_run(client, exp_id, "RUNNING"),
        "killed": _crafted_run(client, exp_id, "KILLED"),
        "finished": _crafted_run(client, exp_id),
        "other_split": _crafted_run(client, exp_id, digest="0000"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "MLFLOW_TRACKING_URI": server.uri,
            "KD_MLFLOW_CACHE": str(cache_dir),
            "MLFLOW_EXPERIMENT_NAME": name,
        }.items():
            mp.setenv(key, value)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        yield ids, lambda: {r.info.run_id for r in client.search_runs([exp_id], max_results=1000)}


CASES = [
    # (id, args, the parameter the message must name)
    ("seed-not-int", ["train", "--seed", "x", *SMOKE], "--seed"),
    ("seed-negative", ["train", "--seed", "-1", *SMOKE], "--seed"),
    ("seed-missing", ["train", *SMOKE], "--seed"),
    ("unknown-preset", ["train", "--seed", "0", "--preset", "tiny"], "--preset"),
    ("unknown-dataset", ["train", "--seed", "0", *SMOKE, "--dataset", "mnist"], "--dataset"),
    ("unknown-model", ["train", "--seed", "0", *SMOKE, "--model", "vgg11"], "--model"),
    ("epochs-zero", ["train", "--seed", "0", *SMOKE, "--epochs", "0"], "epochs"),
    ("epochs-not-int", ["train", "--seed", "0", *SMOKE, "--epochs", "1.5"], "--epochs"),
    ("batch-zero", ["train", "--seed", "0", *SMOKE, "--batch-size", "0"], "batch_size"),
    ("lr-zero", ["train", "--seed", "0", *SMOKE, "--lr", "0"], "lr"),
    ("lr-text", ["train", "--seed", "0", *SMOKE, "--lr", "fast"], "--lr"),
    ("width-zero", ["train", "--seed", "0", *SMOKE, "--width", "0"], "width"),
    ("mean-two-values", ["train", "--seed", "0", *SMOKE, "--mean", "0.5,0.5"], "--mean"),
    ("alpha-out-of-range", ["train", "--seed", "0", *SMOKE, "--alpha", "1.5"], "alpha"),
    ("temperature-zero", ["train", "--seed", "0", *SMOKE, "--temperature", "0"], "temperature"),
    ("val-size-too-big", ["train", "--seed", "0", *SMOKE, "--val-size", "100000"], "val_size"),
    ("subset-too-big", ["train", "--seed", "0", *SMOKE, "--train-subset", "100000"], "train_subset"),
    ("unknown-schedule", ["train", "--seed", "0", *SMOKE, "--schedule", "step"], "--schedule"),
    ("folder-without-dir", ["train", "--seed", "0", "--preset", "cpu-demo"], "data_dir"),
    ("missing-data-dir", ["train", "--seed", "0", "--preset", "cpu-demo", "--data-dir", "/no/such/dir"], "data_dir"),
    ("folder-without-train", ["train", "--seed", "0", "--preset", "cpu-demo", "--data-dir", "{empty}"], "data_dir"),
    ("unknown-option", ["train", "--seed", "0", "--sead", "1"], "--sead"),
    ("teacher-unknown", ["distill", "--teacher", "0123456789abcdef", "--seed", "1"], "teacher"),
    ("teacher-running", ["distill", "--teacher", "{running}", "--seed", "1"], "teacher"),
    ("teacher-killed", ["distill", "--teacher", "{killed}", "--seed", "1"], "teacher"),
    ("teacher-no-model", ["distill", "--teacher", "{finished}", "--seed", "1"], "teacher"),
    ("teacher-other-split", ["distill", "--teacher", "{other_split}", "--seed", "1"], "teacher"),
    ("distill-alpha", ["distill", "--teacher", "{finished}", "--seed", "1", "--alpha", "2"], "alpha"),
    (
        "distill-temperature",
        ["distill", "--teacher", "{finished}", "--seed", "1", "--temperature", "-1"],
        "temperature",
    ),
    ("distill-seed", ["distill", "--teacher", "{finished}", "--seed", "-3"], "--seed"),
    ("one-member", ["ensemble", "--members", "{finished}"], "members"),
    ("same-member-twice", ["ensemble", "--members", "{finished},{finished}"], "members"),
    ("member-unknown", ["ensemble", "--members", "{finished},0123456789abcdef"], "members"),
    ("member-running", ["ensemble", "--members", "{finished},{running}"], "members"),
    ("members-and-seeds", ["ensemble", "--members", "{finished}", "--seeds", "0,1"], "members"),
    ("no-members", ["ensemble"], "members"),
    ("seeds-without-runs", ["ensemble", "--seeds", "7,8", *SMOKE], "seeds"),
    ("seeds-malformed", ["ensemble", "--seeds", "a-b"], "seeds"),
    ("combine-unknown", ["ensemble", "--seeds", "0,1", "--combine", "vote"], "--combine"),
    ("compare-format", ["compare", "--format", "xml"], "--format"),
    ("compare-table", ["compare", "--format", "csv", "--table", "sumary"], "table"),
    ("compare-no-experiment", ["compare", "--experiment", "no-such-experiment-xyz"], "experiment"),
    ("study-one-seed", ["reproduce", *SMOKE, "--seeds", "0"], "seeds"),
    ("study-jobs-zero", ["reproduce", *SMOKE, "--jobs", "0"], "--jobs"),
    ("study-offset-zero", ["reproduce", *SMOKE, "--student-seed-offset", "0"], "--student-seed-offset"),
    (
        "study-offset-clash",
        ["reproduce", *SMOKE, "--seeds", "0-4", "--student-seed-offset", "2"],
        "student_seed_offset",
    ),
    ("study-epochs", ["reproduce", *SMOKE, "--epochs", "-2"], "epochs"),
    (
        "study-student-width",
        ["reproduce", *SMOKE, "--student-model", "resnet8", "--student-width", "0"],
        "--student-width",
    ),
    ("study-sweep-kd-value", ["reproduce", *SMOKE, "--sweep-kd", "alpha=0.5,2"], "alpha"),
]


@pytest.mark.parametrize("args,names", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_creates_no_run(crafted, tmp_path, args, names):
    ids, runs = crafted
    (tmp_path / "empty").mkdir()
    before = runs()
    args = [a.format(empty=tmp_path / "empty", **ids) for a in args]

    res = invoke(*args)

    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.output
    assert names in lines[0] or names.replace("_", "-") in lines[0], lines[0]
    assert runs() == before


def test_bad_mlproject_parameter_is_refused_by_the_cli(tracked):
    """MLflow does not check int parameters; the CLI does. (`mlflow run` has already
    created its run by then; it ends FAILED, never RUNNING, with the reason in kd.failure.)"""
    params = {"seed": "two", "preset": "smoke"}
    proc = mlflow_run("train", params, {**os.environ, **tracked.env}, tracked.experiment, timeout=300)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("kd-mlflow: error")]
    assert len(ours) == 1 and "--seed" in ours[0] and "'two' is not an integer" in ours[0]
    assert "Traceback" not in proc.stderr
    (run,) = tracked.runs()  # the run `mlflow run` created: there, and not left RUNNING
    assert run.info.status == "FAILED"
    failure = run.data.tags.get(schema.FAILURE, "")
    assert "--seed" in failure and "'two' is not an integer" in failure


def _offline(env, tmp_path):
    """No network for a download: every proxy points at a closed port (the loopback
    tracking server stays reachable)."""
    closed = "http://127.0.0.1:9"
    return {
        **env,
        "KD_MLFLOW_CACHE": str(tmp_path / "empty-cache"),
        "https_proxy": closed,
        "HTTPS_PROXY": closed,
        "http_proxy": closed,
        "HTTP_PROXY": closed,
        "no_proxy": "127.0.0.1,localhost",
        "NO_PROXY": "127.0.0.1,localhost",
    }


def test_default_preset_without_network_is_one_line_and_creates_no_run(tracked, tmp_path):
    """No network is the environment's failure (exit 1), not the user's."""
    proc = run_cli("train", "--seed", "2", env=_offline(tracked.env, tmp_path))
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "cifar10: the download from" in lines[0] and "connection refused" in lines[0] and "--data-dir" in lines[0]
    assert tracked.runs() == []


@pytest.mark.parametrize("case", ["broken-archive", "mismatched-classes"])
def test_broken_data_is_one_line_and_creates_no_run(tracked, tmp_path, case):
    from PIL import Image

    if case == "broken-archive":
        where = tmp_path / "data.tar.gz"
        where.write_bytes(b"\x1f\x8b not really gzip" * 50)
    else:
        where = tmp_path / "tree"
        for split, classes in (("train", ("a", "b")), ("test", ("a", "c"))):
            for cls in classes:
                (where / split / cls).mkdir(parents=True)
                Image.new("RGB", (8, 8)).save(where / split / cls / "0.png")
    proc = run_cli("train", "--seed", "0", "--preset", "cpu-demo", "--data-dir", where, env=tracked.env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data_dir" in lines[0] and "folder" in lines[0], proc.stderr[-2000:]
    assert tracked.runs() == []


def test_under_mlflow_run_a_data_failure_ends_mlflows_run_failed_with_the_reason(tracked, tmp_path):
    env = _offline({**os.environ, **tracked.env}, tmp_path)
    proc = mlflow_run("train", {"seed": 2}, env, tracked.experiment, timeout=300)
    assert proc.returncode != 0
    (run,) = tracked.runs()
    assert run.info.status == "FAILED"
    assert "cifar10" in run.data.tags[schema.FAILURE]


# --- damaged archives (issue 29, item 6) ---------------------------------------------


def _image_tree(root):
    """A tiny ImageFolder tree of noise (it does not compress, so half an archive is
    half its members): two classes, train/ and test/."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(12):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def _archive(tmp_path, kind):
    """A whole archive of the tree (kind: tar.gz or zip) and its damaged copy: the
    tar.gz cut in half (EOFError), the zip with bytes flipped inside a member (its CRC)."""
    import shutil
    import zipfile

    tree = _image_tree(tmp_path / "tree")
    whole = Path(shutil.make_archive(str(tmp_path / "whole"), "gztar" if kind == "tar.gz" else "zip", tree))
    b = bytearray(whole.read_bytes())
    if kind == "tar.gz":
        b = b[: len(b) // 2]
    else:
        with zipfile.ZipFile(whole) as z:  # a member past the first, its data's middle
            info = z.infolist()[len(z.infolist()) // 2]
        middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
        b[middle : middle + 16] = bytes(x ^ 0xFF for x in b[middle : middle + 16])
    damaged = tmp_path / f"damaged.{kind}"
    damaged.write_bytes(bytes(b))
    return whole, damaged


def _files(cache):
    return sorted(p.relative_to(cache) for p in cache.rglob("*") if p.is_file())


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_a_damaged_archive_is_the_users_file_and_leaves_the_cache_as_it_was(tmp_path, kind):
    from kd_mlflow import data, errors

    whole, damaged = _archive(tmp_path, kind)
    cache = tmp_path / "cache"
    with pytest.raises(config.ConfigError) as e:
        data.load("folder", str(damaged), cache)
    code, line = errors.verdict(e.value)
    assert code == 2 and str(damaged) in line and "dataset 'folder'" in line and "truncated or corrupt" in line
    assert _files(cache) == [] and not any((cache / "unpacked").iterdir())  # nothing half-unpacked
    src = data.load("folder", str(whole), cache)  # the whole archive of the same tree loads
    assert src.classes == ("a", "b") and len(src.train_y) == len(src.test_y) == 24
    assert [p.name.startswith(".") for p in (cache / "unpacked").iterdir()] == [False]  # no temporary folder


def test_concurrent_unpackers_keep_the_first_whole_copy(tmp_path, monkeypatch):
    """Another process renames its copy into place while this one unpacks: this one
    keeps that copy and removes its own."""
    from kd_mlflow import data

    whole, _ = _archive(tmp_path, "tar.gz")
    dest = tmp_path / "unpacked" / "key"
    extract = data._extract

    def racing(archive, into):
        extract(archive, into)
        monkeypatch.setattr(data, "_extract", extract)
        data._unpack(archive, dest)  # the other process, done first

    monkeypatch.setattr(data, "_extract", racing)
    assert data._unpack(whole, dest) == dest
    assert [p.name for p in dest.parent.iterdir()] == ["key"] and (dest / ".complete").exists()
    assert sorted(p.name for p in (dest / "train").iterdir()) == ["a", "b"]


def test_a_truncated_archive_on_the_command_line_is_exit_2_naming_it_and_creates_no_run(tracked, tmp_path):
    _, damaged = _archive(tmp_path, "tar.gz")
    cache = tmp_path / "cache"
    env = {**tracked.env, "KD_MLFLOW_CACHE": str(cache)}
    proc = run_cli("train", "--seed", "0", "--preset", "cpu-demo", "--data-dir", damaged, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert str(damaged) in lines[0] and "dataset 'folder'" in lines[0] and "truncated or corrupt" in lines[0]
    assert _files(cache) == []
    assert tracked.runs() == []
