"""The tracking store as kd-mlflow calls it: every call bounded, voiced, and its failure
in our words (:func:`watched`, :func:`client`); a :class:`Session` (the client and the
experiment it writes to); and, before any work, whether the user may write there
(:func:`check_write_access`). With :mod:`kd_mlflow.tracking.claims`, :mod:`kd_mlflow.tracking`
and :mod:`kd_mlflow.runs`, the only modules that import mlflow.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import cast

import mlflow
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from .. import waits
from ..config import ConfigError
from ..errors import GaveUp, TrackingRefused, TrackingUnavailable, one_line

DEFAULT_EXPERIMENT = "mysteries"


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


# MLflow's own client settings, unless the user set them: each request waits at most the
# network bound between bytes (MLflow's default is 120 s), and is retried twice (its
# default, 7 with backoff, is minutes of silence). The values this module set are
# updated when the bound changes; a user's own are left alone.
_SET_HERE: dict[str, str] = {}


def _client_defaults() -> None:
    wanted = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(waits.timeout()))),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        # A progress bar per downloaded artifact (predictions, weights) is noise in a log.
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    for key, value in wanted.items():
        if key not in os.environ or os.environ[key] == _SET_HERE.get(key):
            os.environ[key] = _SET_HERE[key] = value


def _attempts() -> int:
    try:
        return int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")) + 1
    except ValueError:
        return 1


# --- every call bounded, voiced, and its failure in our words ------------------------

# Calls that move a file: bounded per stall (MLFLOW_HTTP_REQUEST_TIMEOUT between bytes),
# not as a whole: a large model on a slow link may take longer than the bound.
_TRANSFERS = {
    "log_artifact",
    "log_artifacts",
    "log_model_artifacts",
    "log_text",
    "log_dict",
    "log_figure",
    "log_image",
    "download_artifacts",
}


def _remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def watched(action: str, fn, *, transfer: bool = False):
    """``fn()``, a call to the tracking store: on a server, it speaks after 10 s and gives
    up at the bound (:mod:`kd_mlflow.waits`); a failure of the server or the network
    becomes one line naming the server, what was tried, for how long, and what to do
    (:class:`TrackingUnavailable`, :class:`TrackingRefused`). MLflow's other errors (an
    answer: no such run, already exists) pass through unchanged. A server that has
    answered this process before and is away (restarting) is waited for, up to the bound
    (see :func:`_while_restarting`)."""
    uri = tracking_uri()
    t0 = time.monotonic()
    try:
        if not (_remote(uri) or transfer):
            return fn()  # a local store: no network to wait on
        # A transfer beside a local store may still cross the network (an S3 or http artifact store).
        what = f"the tracking server {uri}: {action}" if _remote(uri) else f"the artifact store: {action}"
        with waits.waiting(what, deadline=not transfer) as bound:
            return _while_restarting(fn, uri, t0 + bound)
    except GaveUp as e:
        raise TrackingUnavailable(
            f"tracking server {uri} did not answer ({action}) within {e.seconds:g} s: check that it is up "
            "(its log, its database), or raise --network-timeout (KD_MLFLOW_NETWORK_TIMEOUT)"
        ) from None
    except Exception as e:
        mine = _in_our_words(e, uri, action, time.monotonic() - t0)
        if mine is None:
            raise
        raise mine from None


# Tracking servers that have answered this process: one of them that refuses the
# connection or drops it is restarting, not misnamed, and is worth waiting for. (Server
# errors are MLflow's own retries' to ride out: a server that answers 5xx is up.)
_ANSWERED: set[str] = set()
_PATIENT: contextvars.ContextVar[bool] = contextvars.ContextVar("kd_mlflow_patient", default=True)
_RESTARTING = ("refused", "dropped")  # kinds of failure (see _kind)


@contextlib.contextmanager
def impatient():
    """Calls inside fail at the first failure MLflow's own retries leave, without waiting
    for a restarting server (an epoch's metrics: the sink keeps them, training goes on)."""
    token = _PATIENT.set(False)
    try:
        yield
    finally:
        _PATIENT.reset(token)


def _while_restarting(fn, uri: str, until: float):
    """``fn()``; while a server that has answered this process before is restarting,
    ``fn()`` again after a pause (0.5 s, doubling, at most 5 s), until ``until`` (the
    bound; on the main thread the alarm of :func:`kd_mlflow.waits.waiting` ends it there
    too). A call that failed at the connection never reached the server; one whose
    connection was dropped may have: every write kd-mlflow repeats is idempotent (the
    same metrics with the same timestamps, the same params, tags and files, a status)."""
    pause = 0.5
    while True:
        try:
            out = fn()
        except Exception as e:
            waited_for = uri in _ANSWERED and _PATIENT.get() and _kind(list(_chain(e))) in _RESTARTING
            if not waited_for or time.monotonic() + pause > until:
                raise
            time.sleep(pause)
            pause = min(2 * pause, 5.0)
            continue
        _ANSWERED.add(uri)
        return out


def client() -> MlflowClient:
    """An MlflowClient whose every call goes through :func:`watched` (same methods), under
    this module's client settings."""
    _client_defaults()
    return cast(MlflowClient, _Watched(MlflowClient()))


class _Watched:
    """An MlflowClient whose every call goes through :func:`watched`."""

    def __init__(self, client: MlflowClient):
        self._client = client

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if name.startswith("_") or not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            return watched(name.replace("_", " "), lambda: attr(*args, **kwargs), transfer=name in _TRANSFERS)

        return call


def _chain(e: BaseException):
    """The exception and its causes, outermost first."""
    seen = set()
    link: BaseException | None = e
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def _in_our_words(e: Exception, uri: str, action: str, seconds: float) -> Exception | None:
    """The failure as TrackingRefused / TrackingUnavailable, or None if it is an answer."""
    import requests

    if isinstance(e, MlflowException):
        code = e.error_code
        if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or " 401 " in str(e) or " 403 " in str(e):
            why = (
                "HTTP 403, permission denied"
                if code == "PERMISSION_DENIED" or " 403 " in str(e)
                else "HTTP 401, not authenticated"
            )
            return TrackingRefused(
                f"{uri} refused the request ({why}): check MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD, and your permission on the experiment"
            )
    chain = list(_chain(e))
    kind = _kind(chain)
    up = "check that it is up (its log, its database), or raise --network-timeout (KD_MLFLOW_NETWORK_TIMEOUT)"
    if kind == "refused":
        why, todo = "refused the connection", "is it running? start it, or set MLFLOW_TRACKING_URI to one that is"
    elif kind == "no-host":
        why, todo = "cannot be found (no such host)", "check the host name in MLFLOW_TRACKING_URI"
    elif kind == "connect-timeout":
        why, todo = "did not accept the connection", "check the network (a firewall, a VPN) and MLFLOW_TRACKING_URI"
    elif kind == "read-timeout":
        per = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "?")
        why, todo = f"accepted the connection but did not answer ({per} s per attempt)", up
    elif kind == "server-errors":
        why, todo = "answered every attempt with a server error (HTTP 5xx)", "see the server's log"
    elif kind == "tls":
        tls = next(x for x in chain if isinstance(x, requests.exceptions.SSLError))
        why = "failed the TLS handshake: " + one_line(str(tls), 160)
        todo = "check the certificate (MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH)"
    elif kind == "dropped":
        why = "dropped the connection: " + (one_line(str(chain[-1]), 160) or type(chain[-1]).__name__)
        todo = "check that it is up and the network between, then run the same command again"
    elif _remote(uri) and isinstance(e, RestException) and e.get_http_status_code() >= 500:
        why, todo = f"failed the request (HTTP {e.get_http_status_code()}: {one_line(str(e), 160)})", "see its log"
    elif not _remote(uri) and (db := next((x for x in chain if type(x).__name__ == "OperationalError"), None)):
        inner = one_line(str(getattr(db, "orig", db)), 200)
        return TrackingUnavailable(f"tracking store {uri} failed ({action}): {inner}")
    else:
        return None
    n = _attempts()
    tried = f"({action}; {n} attempt{'s' if n != 1 else ''} in {seconds:.0f} s)"
    return TrackingUnavailable(f"{_who(chain, uri)} {why} {tried}: {todo}")


def _kind(chain: list) -> str | None:
    """What went wrong on the way to the server, from an exception's chain (outermost
    first), or None when the server answered (an error of MLflow's own)."""
    import requests
    import urllib3.exceptions as u3

    def first(*types):
        return next((x for x in chain if isinstance(x, types)), None)

    if first(ConnectionRefusedError):
        return "refused"
    if first(u3.NameResolutionError, socket.gaierror):
        return "no-host"
    if first(u3.ConnectTimeoutError):
        return "connect-timeout"
    if first(u3.ReadTimeoutError, requests.Timeout, TimeoutError):
        return "read-timeout"
    if first(u3.ResponseError, requests.exceptions.RetryError):
        return "server-errors"
    if first(requests.exceptions.SSLError):
        return "tls"
    if first(requests.ConnectionError, u3.ProtocolError, ConnectionError):
        return "dropped"
    return None


def _who(chain: list, uri: str) -> str:
    """The tracking server, or another host the request went to (an artifact store)."""
    from urllib.parse import urlsplit

    import urllib3.exceptions as u3

    pool = next((getattr(x, "pool", None) for x in chain if isinstance(x, u3.MaxRetryError)), None)
    if pool is None or not getattr(pool, "host", None):
        return f"tracking server {uri}"
    where = f"{pool.scheme}://{pool.host}:{pool.port}"
    ours = urlsplit(uri)
    default = {"http": 80, "https": 443}.get(ours.scheme)
    if _remote(uri) and (ours.hostname, ours.port or default) == (pool.host, pool.port):
        return f"tracking server {uri}"
    return f"artifact store {where}"


@dataclass
class Session:
    client: MlflowClient  # behind _Watched (see client): every call bounded and voiced
    experiment_id: str
    adopted_run_id: str | None  # the run `mlflow run` created, if any
    default_experiment: bool = False  # MLflow's "Default" experiment (id 0)

    def without_adoption(self) -> Session:
        """The same experiment, for runs that must not take over the adopted run."""
        return dataclasses.replace(self, adopted_run_id=None)

    # --- lookups -------------------------------------------------------------
    def search(self, filter_string: str = "", statuses=("FINISHED",), max_results: int = 5000):
        """Runs matching ``filter_string`` with one of ``statuses``, newest first (MLflow's
        filter language has no OR, so several statuses are filtered here)."""
        parts = [filter_string] if filter_string else []
        if len(statuses) == 1:
            parts.append(f"attributes.status = '{statuses[0]}'")
        runs = self.client.search_runs(
            [self.experiment_id], " AND ".join(parts), max_results=max_results, order_by=["attributes.start_time DESC"]
        )
        return [r for r in runs if r.info.status in statuses]

    def logged_epochs(self, run_id: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(run_id, "val_acc")}

    def get_run(self, run_id: str, option: str):
        try:
            return self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            raise ConfigError(option, run_id, f"no such run on {tracking_uri()}") from None

    def artifact_paths(self, run_id: str, folder: str) -> set[str]:
        return {f.path for f in self.client.list_artifacts(run_id, folder)}


_WARNED_PLAIN: set[str] = set()


def warn_plain_credentials(uri: str) -> None:
    """One line, once per process and server, when a password is about to travel in
    clear: basic auth over http:// to a host that is not loopback (every request
    carries it; a TLS proxy in front of the server keeps it private, docker/README.md)."""
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(uri).hostname or ""
    if not uri.startswith("http://") or not os.environ.get("MLFLOW_TRACKING_PASSWORD") or uri in _WARNED_PLAIN:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: loopback only if it resolves there
        try:
            loopback = ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            loopback = False
    if not loopback:
        _WARNED_PLAIN.add(uri)
        print(
            f"warning: MLFLOW_TRACKING_PASSWORD is sent in clear to {uri} (plain http): "
            "use https:// (a TLS proxy in front of the server)",
            file=sys.stderr,
        )


# Permissions of MLflow's basic-auth that let a user write runs into an experiment.
_WRITERS = ("EDIT", "MANAGE")


def check_write_access(experiment: str | None) -> None:
    """Refuse, before any work, a user whom the tracking server will not let write runs
    into the experiment: one line naming the user, the experiment and the permission
    needed (TrackingRefused, exit 1). The server is asked for the user's effective
    permission, as its own check would resolve it (basic-auth's
    ``/api/3.0/mlflow/users/permissions/get``, which any user may ask about themself).
    Not checked: a local store, a run ``mlflow run`` made (already written to), a
    request without credentials (the first call says 401), an experiment not there yet
    (the command creates it and so manages it), a server without auth (404)."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    uri = tracking_uri()
    if not _remote(uri) or os.environ.get("MLFLOW_RUN_ID"):
        return
    _client_defaults()
    creds = get_default_host_creds(uri)
    if not creds.username:
        return

    def ask(path: str, **params):
        r = watched("check permissions", lambda: http_request(creds, path, "GET", params=params))
        return r.status_code, (r.json() if r.status_code == 200 else None)

    env_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or (None if env_id else DEFAULT_EXPERIMENT)
    status, body = (
        ask("/api/2.0/mlflow/experiments/get-by-name", experiment_name=name)
        if name
        else ask("/api/2.0/mlflow/experiments/get", experiment_id=env_id)
    )
    what = f"experiment {name or env_id!r} on {uri}"
    todo = "ask its owner or an admin to grant it"
    if status == 403:
        raise TrackingRefused(f"user {creds.username!r} has no permission on {what}: writing runs needs EDIT; {todo}")
    if status != 200:
        return
    exp_id = body["experiment"]["experiment_id"]
    status, body = ask(
        "/api/3.0/mlflow/users/permissions/get",
        username=creds.username,
        resource_type="experiment",
        resource_id=exp_id,
    )
    held = (body or {}).get("permission")
    if status == 200 and held not in _WRITERS:
        raise TrackingRefused(
            f"user {creds.username!r} holds {held} on {what}: writing runs needs EDIT (or MANAGE); {todo}"
        )
