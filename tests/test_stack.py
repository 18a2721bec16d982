"""The production tracking stack of docker/, without docker.

The compose-file checks run everywhere. The live checks start what the compose file
describes on this machine: a PostgreSQL cluster (the tracking and the auth database)
and ``mlflow server --app-name basic-auth`` with the compose service's arguments and
auth configuration (tests/stack_server.py), then drive ``kd-mlflow`` through it as
users would. They skip, saying why, where the PostgreSQL server binaries are missing
(.ci/install-postgres.sh installs them).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import stack_postgres
import yaml
from stack_server import (
    COMPOSE,
    DOCKER,
    StackServer,
    TlsProxy,
    compose,
    env_example,
    interpolate,
    referenced_vars,
    self_signed_certificate,
)

REPO = DOCKER.parent
IMAGE = "ghcr.io/mlflow/mlflow:v3.17.2-full"
SECRETS = {
    "POSTGRES_PASSWORD": "pg-test-password-1",
    "MLFLOW_ADMIN_PASSWORD": "admin-test-password-1",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-test-secret-key-1",
}
ADMIN = ("admin", SECRETS["MLFLOW_ADMIN_PASSWORD"])
ALICE = ("alice", "alice-test-password-1")
BOB = ("bob", "bob-test-password-1")
CAROL = ("carol", "carol-test-password-1")  # denied alice's experiment
EXPERIMENT = "stack-smoke"
OLD = "stack-old"  # runs as logged before runs logged predictions and calibration


def _args(service: dict) -> list[str]:
    return [*(service.get("entrypoint") or []), *(service.get("command") or [])]


def _flags(args: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)


def _one_shot(service: dict) -> bool:
    return str(service.get("restart", "")) == "no"


# --- the files: no postgres, no docker ------------------------------------------


def test_compose_references_resolve():
    """Every service, volume, file, health check and variable the compose file names exists."""
    text = COMPOSE.read_text()
    spec = compose()
    services, volumes = spec["services"], spec.get("volumes") or {}
    example = env_example()
    problems = []
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        for dep in deps:
            cond = deps[dep].get("condition") if isinstance(deps, dict) else None
            if dep not in services:
                problems.append(f"{name}: depends on missing service {dep}")
            elif cond == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{name}: waits for {dep} to be healthy, which has no health check")
            elif cond == "service_completed_successfully" and not _one_shot(services[dep]):
                problems.append(f"{name}: waits for {dep} to complete, which is not a one-shot")
        for mount in svc.get("volumes") or []:
            source = mount.split(":")[0] if isinstance(mount, str) else mount["source"]
            if source.startswith((".", "/")):
                if not (DOCKER / source).exists():
                    problems.append(f"{name}: bind mount {source} does not exist")
            elif source not in volumes:
                problems.append(f"{name}: volume {source} is not declared")
        if "build" in svc:
            context = DOCKER / svc["build"]["context"]
            if not (context / svc["build"].get("dockerfile", "Dockerfile")).is_file():
                problems.append(f"{name}: no Dockerfile at {svc['build']}")
        if not _one_shot(svc):
            test = (svc.get("healthcheck") or {}).get("test")
            if not test or test[0] not in ("CMD", "CMD-SHELL"):
                problems.append(f"{name}: long-running service without a health check")
    # `docker compose up --wait` fails on a one-shot that exits unless a service it
    # starts waits for that exit (jobs behind a profile are only ever `run`).
    adopted = {
        dep
        for svc in services.values()
        if not _one_shot(svc)
        for dep, how in (svc.get("depends_on") or {}).items()
        if isinstance(how, dict) and how.get("condition") == "service_completed_successfully"
    }
    problems += [
        f"{name}: one-shot that no long-running service waits for"
        for name, svc in services.items()
        if _one_shot(svc) and not svc.get("profiles") and name not in adopted
    ]
    used = referenced_vars(text)
    problems += [f"${{{v}}} is not in docker/.env.example" for v in sorted(used - set(example))]
    problems += [f"docker/.env.example sets unused {v}" for v in sorted(set(example) - used)]
    assert not problems, "\n".join(problems)
    # With the example's values every variable resolves and the file still parses.
    assert yaml.safe_load(interpolate(text, example))["services"].keys() == services.keys()


def test_compose_server_is_authenticated_postgres_backed_and_migrated_first():
    from mlflow.cli import server as server_command

    services = compose()["services"]
    server, migrate = services["mlflow"], services["migrate"]
    assert server["image"] == migrate["image"] == IMAGE
    args = _args(server)
    assert args[:2] == ["mlflow", "server"]
    known = {opt for p in server_command.params for opt in p.opts}
    unknown = [a.split("=")[0] for a in args[2:] if a.split("=")[0] not in known]
    assert not unknown, f"not options of this MLflow's `mlflow server`: {unknown}"
    flags = _flags(args)
    assert flags["--app-name"] == "basic-auth"
    assert flags["--backend-store-uri"].startswith("postgresql")
    assert "--serve-artifacts" in args and flags["--artifacts-destination"]
    allowed = flags["--allowed-hosts"].split(",")
    assert {"mlflow", f"mlflow:{flags['--port']}", "localhost"} <= set(allowed)
    assert "*" not in allowed
    # The schema upgrade runs once, on the server's database, and the server waits for it.
    assert _args(migrate) == ["mlflow", "db", "upgrade", flags["--backend-store-uri"]]
    assert server["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # Secrets come from the environment, never from the committed files.
    env = server["environment"]
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD"):
        assert re.fullmatch(r"\$\{[A-Z_]+:\?.+\}", env[name]), f"{name} must come from docker/.env"
    assert re.match(r"postgresql(\+\w+)?://\w+@postgres:5432/\w+$", flags["--backend-store-uri"]), (
        "no password in the URI: libpq reads PGPASSWORD"
    )
    # The auth configuration mounted where MLFLOW_AUTH_CONFIG_PATH points, on postgres.
    mounts = {m.split(":")[1]: m.split(":")[0] for m in server["volumes"]}
    ini = configparser.ConfigParser()
    ini.read(DOCKER / mounts[env["MLFLOW_AUTH_CONFIG_PATH"]])
    auth_db = ini["mlflow"]["database_uri"]
    assert auth_db.startswith("postgresql") and "@postgres:5432/" in auth_db
    assert "admin_password" not in ini["mlflow"]
    init_sql = " ".join(p.read_text() for p in (DOCKER / "postgres-init").glob("*.sql"))
    assert f"CREATE DATABASE {auth_db.rsplit('/', 1)[1]}" in init_sql


def test_env_file_is_an_example_and_ignored():
    example = env_example()
    for name in ("POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD"):
        assert len(example[name]) >= 12, "MLflow refuses passwords under 12 characters"
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "docker/.env" in ignored


def test_training_image_is_cuda_pytorch_with_kd_mlflow_entrypoint():
    text = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)", text, re.M).group(1)
    assert base.startswith("pytorch/pytorch:") and "cuda" in base and base.endswith("-runtime")
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)
    assert re.search(r"^RUN pip install \.", text, re.M)
    assert re.search(r'^ENTRYPOINT \["kd-mlflow"\]$', text, re.M)
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for name in source.split():
            assert list(REPO.glob(name)) or "*" in name, f"COPY of missing {name}"


# --- the live stack ------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """PostgreSQL + the compose file's MLflow server, with users alice and bob."""
    reason = stack_postgres.unavailable_reason()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("psycopg2", reason="psycopg2 is missing (pip install psycopg2-binary)")
    pytest.importorskip("flask_wtf", reason="Flask-WTF is missing (pip install 'mlflow[auth]')")
    root = tmp_path_factory.mktemp("stack")
    with stack_postgres.PostgresCluster(SECRETS["POSTGRES_PASSWORD"], DOCKER / "postgres-init") as pg:
        # Two workers, not the compose file's four: enough to exercise several workers
        # against one auth store on a small test machine.
        with StackServer(root / "server", pg, SECRETS, workers=2) as server:
            for user, password in (ALICE, BOB, CAROL):
                status, body = server.request(
                    "POST", "/api/2.0/mlflow/users/create", {"username": user, "password": password}, auth=ADMIN
                )
                assert status == 200, body
            # Alice's experiment: she manages it, bob may only read it.
            status, body = server.request(
                "POST", "/api/2.0/mlflow/experiments/create", {"name": EXPERIMENT}, auth=ALICE
            )
            assert status == 200, body
            grant = {"username": CAROL[0], "resource_type": "experiment", "permission": "DENY"}
            grant["resource_id"] = body["experiment_id"]
            status, body = server.request("POST", "/api/3.0/mlflow/users/permissions/grant", grant, auth=ALICE)
            assert status == 200, body
            yield SimpleNamespace(server=server, pg=pg, root=root)


def _cli(stack, *args, user=None, experiment=EXPERIMENT, uri=None, **more) -> subprocess.Popen:
    """Start the CLI as a user would: only the MLFLOW_* variables given here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        more,
        MLFLOW_TRACKING_URI=uri or stack.server.uri,
        MLFLOW_EXPERIMENT_NAME=experiment,
        KD_MLFLOW_CACHE=str(stack.root / "cache"),
        PYTHONUNBUFFERED="1",
    )
    if user:
        env.update(MLFLOW_TRACKING_USERNAME=user[0], MLFLOW_TRACKING_PASSWORD=user[1])
    return subprocess.Popen(
        [sys.executable, "-m", "kd_mlflow", *args], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _finish(proc: subprocess.Popen, timeout=300) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


TRAIN = ("train", "--seed", "3", "--preset", "smoke")
# case: (user, experiment, command)
REFUSED = {
    "no-credentials": (None, "refused-anonymous", TRAIN),
    "wrong-password": ((ALICE[0], "not-alices-password"), "refused-wrong-password", TRAIN),
    "other-users-experiment": (BOB, EXPERIMENT, TRAIN),
    "read-only-reproduce": (BOB, EXPERIMENT, ("reproduce", "--preset", "smoke", "--seeds", "0,1")),
    "denied-train": (CAROL, EXPERIMENT, TRAIN),
}
# What each refusal that reaches alice's experiment says: the user, the experiment and
# the permission needed, before any data or training.
READ_ONLY = rf"user 'bob' holds READ on experiment '{EXPERIMENT}' on http\S+: writing runs needs EDIT"
NOT_ALLOWED = rf"user 'carol' has no permission on experiment '{EXPERIMENT}' on http\S+: writing runs needs EDIT"


@pytest.fixture(scope="module")
def refusals(stack):
    """`kd-mlflow train` runs the server must refuse. Started together, before the
    study, which they overlap: each only imports, loads the data and is refused."""
    procs = {
        case: _cli(stack, *command, user=user, experiment=experiment)
        for case, (user, experiment, command) in REFUSED.items()
    }
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.fixture(scope="module")
def study(stack, refusals):
    """The smoke study as alice: two seeds (trained at once, as two users' or two shells'
    launches would be: several clients writing through the server's workers), their
    ensemble, the tables."""
    waves = (
        {
            "train 0": ("train", "--seed", "0", "--preset", "smoke"),
            "train 1": ("train", "--seed", "1", "--preset", "smoke"),
        },
        {"ensemble": ("ensemble", "--seeds", "0,1", "--preset", "smoke")},
        {"compare": ("compare", "--format", "json")},
    )
    out, seconds = {}, {}
    start = time.monotonic()
    for wave in waves:
        t = time.monotonic()
        procs = {name: _cli(stack, *args, user=ALICE) for name, args in wave.items()}
        for name, done in [(name, _finish(proc)) for name, proc in procs.items()]:
            assert done.returncode == 0, f"{name}:\n{done.stdout}\n{done.stderr}"
            out[name] = done.stdout
        seconds[" + ".join(wave)] = round(time.monotonic() - t, 1)
    seconds["study"] = round(time.monotonic() - start, 1)
    print(f"\nsmoke study through the authenticated postgres server: {seconds}")
    run_ids = {k: out[k].strip().splitlines()[-1] for k in ("train 0", "train 1", "ensemble")}
    return SimpleNamespace(uri=stack.server.uri, run_ids=run_ids, tables=json.loads(out["compare"]), seconds=seconds)


@pytest.fixture
def as_user(stack, monkeypatch):
    """An MlflowClient of the given user, in this process."""
    from mlflow.tracking import MlflowClient

    def client(user):
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        return MlflowClient(tracking_uri=stack.server.uri)

    return client


def test_smoke_study_finishes_through_the_stack(stack, study, as_user):
    client = as_user(ALICE)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    assert set(study.run_ids.values()) <= set(runs)
    for name, run_id in study.run_ids.items():
        run = runs[run_id]
        assert run.info.status == "FINISHED", name
        assert 0 < run.data.metrics["final_test_acc"] <= 100, name
    # Artifacts went through the server into its artifact store, not to a local path.
    train = runs[study.run_ids["train 0"]]
    assert train.info.artifact_uri.startswith("mlflow-artifacts:")
    assert [f.path for f in client.list_artifacts(train.info.run_id, "weights")] == ["weights/model.pt"]
    assert list((stack.server.root / "artifacts").rglob("model.pt"))
    # compare read the same runs back.
    text = json.dumps(study.tables)
    assert all(run_id in text for run_id in study.run_ids.values())


def _refused_in_one_line(proc, pattern):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(pattern, lines[0], re.I), lines[0]


@pytest.mark.parametrize("case", ["no-credentials", "wrong-password"])
def test_train_without_valid_credentials_fails_in_one_line(stack, refusals, case):
    _refused_in_one_line(_finish(refusals[case], timeout=120), r"401|not authenticated")
    # Refused before anything was created, let alone trained.
    status, _ = stack.server.request(
        "GET", f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={REFUSED[case][1]}", auth=ADMIN
    )
    assert status == 404


@pytest.mark.parametrize(
    "case, pattern",
    [("other-users-experiment", READ_ONLY), ("read-only-reproduce", READ_ONLY), ("denied-train", NOT_ALLOWED)],
)
def test_writing_without_permission_is_refused_before_training_in_one_line(
    stack, study, refusals, as_user, case, pattern
):
    done = _finish(refusals[case], timeout=120)
    _refused_in_one_line(done, pattern)
    assert done.returncode == 1  # the environment refused
    from mlflow.entities import ViewType

    admin = as_user(ADMIN)
    runs = admin.search_runs([admin.get_experiment_by_name(EXPERIMENT).experiment_id], run_view_type=ViewType.ALL)
    assert {r.info.run_id for r in runs} == set(study.run_ids.values()), "bob's run was created"


def test_second_user_can_read_but_not_write_the_first_users_experiment(study, as_user):
    from mlflow.exceptions import MlflowException

    bob = as_user(BOB)
    exp = bob.get_experiment_by_name(EXPERIMENT)  # default_permission = READ
    run_id = study.run_ids["train 0"]
    assert bob.get_run(run_id).info.status == "FINISHED"
    with pytest.raises(MlflowException) as e:
        bob.create_run(exp.experiment_id)
    assert e.value.error_code == "PERMISSION_DENIED"
    with pytest.raises(MlflowException) as e:
        bob.set_tag(run_id, "note", "bob was here")
    assert e.value.error_code == "PERMISSION_DENIED"
    assert "note" not in as_user(ALICE).get_run(run_id).data.tags
    # Until alice, who manages her experiment, grants it (as docker/README.md says).
    from mlflow.server import get_app_client

    as_user(ALICE)
    get_app_client("basic-auth", tracking_uri=study.uri).grant_user_permission(
        BOB[0], "experiment", exp.experiment_id, "EDIT"
    )
    as_user(BOB).set_tag(run_id, "note", "bob was here")


def test_foreign_host_header_is_refused(stack):
    path = "/api/2.0/mlflow/experiments/search?max_results=1"
    status, body = stack.server.request("GET", path, auth=ADMIN, headers={"Host": "evil.example"})
    assert status == 403, body
    assert "host" in str(body).lower()
    # The names the compose network and the published port use are admitted.
    for host in ("mlflow:5000", "localhost:5000"):
        status, body = stack.server.request("GET", path, auth=ADMIN, headers={"Host": host})
        assert status == 200, (host, body)


def test_health_needs_no_credentials_but_the_api_does(stack):
    assert stack.server.request("GET", "/health")[0] == 200  # what the compose health check asks
    assert stack.server.request("GET", "/api/2.0/mlflow/experiments/search?max_results=1")[0] == 401


# --- compare is a read; backfill is the write it used to do ------------------------


def _logged_before_predictions(client, run, experiment_id: str, tmp: str) -> str:
    """``run`` logged again as a run made before runs logged their predictions and
    calibration: its params, kd tags, final metrics and weights, nothing more."""
    from kd_mlflow import schema

    tags = {k: v for k, v in run.data.tags.items() if k.startswith("kd.") and k != schema.PREDICTIONS}
    new = client.create_run(experiment_id, run_name=run.info.run_name, tags=tags).info.run_id
    for k, v in run.data.params.items():
        client.log_param(new, k, v)
    for k, v in run.data.metrics.items():
        if k not in schema.CALIBRATION_METRICS:
            client.log_metric(new, k, v)
    client.log_artifacts(new, client.download_artifacts(run.info.run_id, "weights", tmp), "weights")
    client.set_terminated(new, "FINISHED")
    return new


def _snapshot(client, experiment: str) -> dict:
    """Every run's metrics (each one's full history) and tags."""
    exp = client.get_experiment_by_name(experiment)
    out = {}
    for r in client.search_runs([exp.experiment_id]):
        history = {k: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)] for k in r.data.metrics}
        out[r.info.run_id] = (history, dict(r.data.tags))
    return out


@pytest.fixture(scope="module")
def old_runs(stack, study, tmp_path_factory):
    """Alice's experiment OLD: the study's two train runs as runs made before runs
    logged predictions and calibration metrics."""
    from mlflow.tracking import MlflowClient

    os.environ.update(MLFLOW_TRACKING_USERNAME=ALICE[0], MLFLOW_TRACKING_PASSWORD=ALICE[1])
    try:
        client = MlflowClient(tracking_uri=stack.server.uri)
        exp = client.create_experiment(OLD)
        tmp = str(tmp_path_factory.mktemp("weights"))
        return [
            _logged_before_predictions(client, client.get_run(study.run_ids[k]), exp, tmp)
            for k in ("train 0", "train 1")
        ]
    finally:
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(k)


@pytest.fixture(scope="module")
def read_only_compares(stack, study, old_runs):
    """Bob's compare of both experiments in every format, with what the runs held before
    and after (the admin's view)."""
    from mlflow.tracking import MlflowClient

    os.environ.update(MLFLOW_TRACKING_USERNAME=ADMIN[0], MLFLOW_TRACKING_PASSWORD=ADMIN[1])
    try:
        admin = MlflowClient(tracking_uri=stack.server.uri)
        before = {e: _snapshot(admin, e) for e in (EXPERIMENT, OLD)}
        done = {
            (e, fmt): _finish(_cli(stack, "compare", "--format", fmt, user=BOB, experiment=e))
            for e in (EXPERIMENT, OLD)
            for fmt in ("markdown", "csv", "json")
        }
        after = {e: _snapshot(admin, e) for e in (EXPERIMENT, OLD)}
    finally:
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(k)
    return SimpleNamespace(done=done, before=before, after=after)


def test_read_only_compare_returns_the_tables_and_writes_nothing(study, old_runs, read_only_compares):
    for (experiment, fmt), done in read_only_compares.done.items():
        assert done.returncode == 0, (experiment, fmt, done.stderr)
        ids = old_runs if experiment == OLD else [study.run_ids["train 0"], study.run_ids["train 1"]]
        assert all(i in done.stdout for i in ids) if fmt != "markdown" else "| seed |" in done.stdout, (experiment, fmt)
        assert "warning" not in done.stderr  # a loopback server: no password leaves the machine
    assert json.loads(read_only_compares.done[(EXPERIMENT, "json")].stdout) == study.tables
    assert read_only_compares.after == read_only_compares.before  # every metric and tag as it was
    # The runs that lack something are named once, with the command that adds it.
    for fmt in ("markdown", "csv", "json"):
        notes = [line for line in read_only_compares.done[(OLD, fmt)].stderr.splitlines() if "backfill" in line]
        assert len(notes) == 1, read_only_compares.done[(OLD, fmt)].stderr
        assert "2 run(s) lack predictions" in notes[0] and "2 run(s) lack calibration metrics" in notes[0]
        assert all(i[:8] in notes[0] for i in old_runs)
        assert f"`kd-mlflow backfill --experiment {OLD}`" in notes[0]
    assert "backfill" not in read_only_compares.done[(EXPERIMENT, "json")].stderr


def test_backfill_needs_write_access_adds_once_and_then_nothing(stack, old_runs, read_only_compares, as_user):
    from kd_mlflow import schema

    _refused_in_one_line(
        _finish(_cli(stack, "backfill", user=BOB, experiment=OLD)), f"user 'bob' holds READ on experiment '{OLD}'"
    )
    first = _finish(_cli(stack, "backfill", user=ALICE, experiment=OLD))
    assert first.returncode == 0, first.stderr
    assert sorted(first.stdout.splitlines()) == sorted(
        f"run {rid} ({name}): added predictions and calibration metrics"
        for rid, name in zip(old_runs, ("train-seed-0", "train-seed-1"), strict=True)
    )
    alice = as_user(ALICE)
    for rid in old_runs:
        run = alice.get_run(rid)
        assert run.data.tags[schema.PREDICTIONS] and set(schema.CALIBRATION_METRICS) <= set(run.data.metrics)
    second = _finish(_cli(stack, "backfill", user=ALICE, experiment=OLD))
    assert second.returncode == 0 and second.stdout == "", second.stdout
    assert "nothing added" in second.stderr
    # And compare now has nothing to say about them.
    again = _finish(_cli(stack, "compare", user=BOB, experiment=OLD))
    assert again.returncode == 0 and "backfill" not in again.stderr, again.stderr


# --- TLS in front of the server -----------------------------------------------------


@pytest.fixture(scope="module")
def tls(stack, tmp_path_factory):
    """The server behind a TLS-terminating proxy with a self-signed certificate."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl is missing: no certificate to make")
    cert, key = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    with TlsProxy(stack.server.port, cert, key) as proxy:
        yield SimpleNamespace(uri=f"https://127.0.0.1:{proxy.port}", cert=cert)


def test_train_and_compare_through_https_with_the_certificate_given(stack, tls):
    trusted = {"uri": tls.uri, "MLFLOW_TRACKING_SERVER_CERT_PATH": str(tls.cert), "user": ALICE}
    train = _finish(_cli(stack, "train", "--seed", "0", "--preset", "smoke", experiment="stack-tls", **trusted))
    assert train.returncode == 0, train.stderr
    run_id = train.stdout.strip().splitlines()[-1]
    compare = _finish(_cli(stack, "compare", "--format", "json", experiment="stack-tls", **trusted))
    assert compare.returncode == 0, compare.stderr
    assert run_id in compare.stdout


@pytest.mark.parametrize("command", [("compare",), TRAIN])
def test_an_untrusted_certificate_is_one_line_naming_it(stack, tls, command):
    done = _finish(_cli(stack, *command, uri=tls.uri, user=ALICE, experiment="stack-tls-untrusted"))
    _refused_in_one_line(done, r"TLS handshake.*certificate.*MLFLOW_TRACKING_SERVER_CERT_PATH")
    assert done.returncode == 1
