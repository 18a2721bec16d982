"""The compose stack's MLflow server, run here without docker.

The server's arguments, environment and basic-auth configuration are read from
docker/compose.yaml and docker/auth/basic_auth.ini; only what names the container world
is rewritten: the database host, the artifact directory, the bind address and port
(and, optionally, the number of workers, for a small test machine).
"""

from __future__ import annotations

import base64
import configparser
import json
import os
import re
import select
import socket
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from mlflow_server import MlflowServer

DOCKER = Path(__file__).resolve().parents[1] / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
DB_HOST = "postgres:5432"  # the database as the compose network names it
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def referenced_vars(text: str) -> set[str]:
    return set(_VAR.findall(text))


def env_example() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return {k.strip(): v.strip() for k, v in pairs}


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, enough for this file."""

    def one(m):
        name, rest = m.group(1), m.group(0)[len(m.group(1)) + 2 : -1]
        if name in env and env[name] != "":
            return env[name]
        if rest.startswith(":-"):
            return rest[2:]
        raise KeyError(f"{name} is not set ({rest[2:] if rest.startswith(':?') else 'no default'})")

    return _VAR.sub(one, value)


def _command(service: dict) -> list[str]:
    entry, cmd = service.get("entrypoint") or [], service.get("command") or []
    return [*entry, *cmd]


class StackServer(MlflowServer):
    """``mlflow server`` as the compose ``mlflow`` service runs it, against ``pg``."""

    def __init__(self, root: Path, pg, env: dict[str, str], workers: int | None = None):
        super().__init__(root)
        self.pg, self.compose_env, self.workers = pg, env, workers
        self.services = compose()["services"]
        self.auth_ini = self.root / "basic_auth.ini"
        self.env = self._environment()

    def _local(self, arg: str) -> str:
        arg = arg.replace(DB_HOST, f"127.0.0.1:{self.pg.port}")
        artifacts = self.root / "artifacts"
        arg = re.sub(r"^--artifacts-destination=.*", f"--artifacts-destination={artifacts}", arg)
        arg = re.sub(r"^--host=.*", "--host=127.0.0.1", arg)
        if self.workers:
            arg = re.sub(r"^--workers=.*", f"--workers={self.workers}", arg)
        return re.sub(r"^--port=.*", f"--port={self.port}", arg)

    def migrate_command(self) -> list[str]:
        cmd = [self._local(a) for a in _command(self.services["migrate"])]
        assert cmd[0] == "mlflow"
        return [sys.executable, "-m", *cmd]

    def command(self) -> list[str]:
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [self._local(a) for a in _command(self.services["mlflow"])]
        assert cmd[0] == "mlflow"
        return [sys.executable, "-m", *cmd]

    def _environment(self) -> dict[str, str]:
        env = {k: interpolate(str(v), self.compose_env) for k, v in self.services["mlflow"]["environment"].items()}
        self.root.mkdir(parents=True, exist_ok=True)
        ini = configparser.ConfigParser()
        ini.read(DOCKER / "auth" / "basic_auth.ini")
        db = ini["mlflow"]["database_uri"]
        ini["mlflow"]["database_uri"] = db.replace(DB_HOST, f"127.0.0.1:{self.pg.port}")
        with open(self.auth_ini, "w") as f:
            ini.write(f)
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(self.auth_ini)
        return env

    def start(self, timeout: float = 120.0, migrate: bool = True) -> StackServer:
        """The schema upgrade (as the compose ``migrate`` service), then the server;
        ``migrate=False`` for a restart of a server whose database is already upgraded."""
        if not migrate:
            super().start(timeout)
            return self
        proc = subprocess.run(
            self.migrate_command(), env={**os.environ, **self.env}, capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            raise RuntimeError(f"mlflow db upgrade failed:\n{proc.stdout}\n{proc.stderr}")
        super().start(timeout)
        return self

    # --- REST, as a given user -------------------------------------------------
    def request(self, method: str, path: str, body=None, auth=None, headers=None):
        """(status, parsed JSON or text) of one request to the server."""
        req = urllib.request.Request(
            self.uri + path, method=method, data=json.dumps(body).encode() if body is not None else None
        )
        req.add_header("Content-Type", "application/json")
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")


class TlsProxy:
    """A TLS-terminating proxy on a free loopback port in front of a plain-http server
    on ``backend_port``: what the compose stack's proxy does, as bytes piped both ways
    (the server still sees the client's Host header, 127.0.0.1:PORT, which it admits)."""

    def __init__(self, backend_port: int, cert: Path, key: Path):
        self.backend_port = backend_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]

    def __enter__(self) -> TlsProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed: the proxy is done
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):  # a client that does not trust the certificate
            conn.close()
            return
        with tls, socket.create_connection(("127.0.0.1", self.backend_port)) as up:
            try:
                self._pipe(tls, up)
            except OSError:
                pass

    @staticmethod
    def _pipe(tls: ssl.SSLSocket, up: socket.socket) -> None:
        """One thread per connection: an SSL socket must not be read and written from two."""
        while True:
            # Bytes already decrypted inside the SSL socket do not wake select.
            ready = [tls] if tls.pending() else select.select([tls, up], [], [], 120)[0]
            if not ready:
                return
            for src in ready:
                data = src.recv(65536)
                if not data:
                    return
                (up if src is tls else tls).sendall(data)


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1, made with openssl as docker/README.md says."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    req = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
    subprocess.run(
        [*req, "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key
