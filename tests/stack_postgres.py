"""A throwaway PostgreSQL cluster in a temporary directory, on a free loopback port.

Like the compose stack's database: a superuser ``mlflow`` with a password, password
(scram) authentication over TCP, and the init scripts of docker/postgres-init applied
to the database ``mlflow``. initdb refuses to run as root, so as root the server
binaries run as the ``postgres`` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from mlflow_server import free_port

USER, DATABASE = "mlflow", "mlflow"  # as POSTGRES_USER / POSTGRES_DB in docker/compose.yaml


def find_bindir() -> Path | None:
    """The server binaries: PostgreSQL 15 if installed, else the newest, else PATH."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    preferred = [p for p in found if Path(p).parts[-3] == "15"]
    initdb = (preferred or found or [shutil.which("initdb")])[-1]
    return Path(initdb).parent if initdb else None


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if find_bindir() is None:
        return "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb); run .ci/install-postgres.sh"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run initdb as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing"
    return None


class PostgresCluster:
    def __init__(self, password: str, init_scripts: Path | None = None):
        self.password, self.init_scripts = password, init_scripts
        self.bindir = find_bindir()
        self.port = free_port()
        self.root: Path | None = None

    def dsn(self, database: str = DATABASE) -> str:
        """A libpq connection string, for psycopg2.connect."""
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    # --- lifecycle -----------------------------------------------------------
    def start(self) -> PostgresCluster:
        # Not under pytest's tmp_path: its parents are private to root, and the
        # postgres user must reach the data directory.
        self.root = Path(tempfile.mkdtemp(prefix="kd-stack-pg-"))
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._own(self.root)
        self._pg(
            "initdb",
            "-D",
            self.data,
            "-U",
            USER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--no-sync",
        )
        pwfile.unlink()
        self._pg("pg_ctl", "-D", self.data, "-l", self.root / "postgres.log", "-o", self._options(), "-w", "start")
        self._init_database()
        return self

    def restart(self) -> None:
        """``pg_ctl restart -m fast``, as a service manager restarts it: every client's
        connection is closed, open transactions are rolled back; the data stays."""
        log = self.root / "postgres.log"
        self._pg("pg_ctl", "-D", self.data, "-l", log, "-m", "fast", "-o", self._options(), "-w", "restart")

    def _options(self) -> str:
        # Loopback TCP only; the socket lives in the cluster's own directory.
        # fsync=off: a test cluster that dies with its test needs no durability.
        return (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )

    def stop(self) -> None:
        if self.root is None:
            return
        if (Path(self.data) / "postmaster.pid").exists():
            self._pg("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log(self) -> str:
        path = self.root / "postgres.log" if self.root else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    # --- helpers -------------------------------------------------------------
    @property
    def data(self) -> str:
        return str(self.root / "data")

    def _init_database(self) -> None:
        """What the postgres image does on an empty volume: create POSTGRES_DB, then run
        /docker-entrypoint-initdb.d/*.sql against it."""
        import psycopg2

        conn = psycopg2.connect(self.dsn("postgres"))
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            conn.close()
        scripts = sorted(self.init_scripts.glob("*.sql")) if self.init_scripts else []
        if not scripts:
            return
        conn = psycopg2.connect(self.dsn())
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                for script in scripts:
                    cur.execute(script.read_text())
        finally:
            conn.close()

    def _own(self, path: Path) -> None:
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)
            for p in path.rglob("*"):
                os.chown(p, pw.pw_uid, pw.pw_gid)

    def _pg(self, tool: str, *args, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / tool), *map(str, args)]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.root)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{self.log()}")
        return proc
