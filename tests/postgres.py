"""A real PostgreSQL server for the tests: Debian's `postgresql` binaries, initdb + pg_ctl in a temp folder.

The server listens on a Unix socket in its own folder only (no TCP port, so parallel test runs never collide),
trusts local connections, and runs without fsync (a test database need not survive a power cut). initdb and
postgres refuse to run as root: as root (CI) they run as the `postgres` user the Debian package makes, or
`nobody`. Each test database is made with CREATE DATABASE and dropped when its test ends.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from sqlalchemy.engine import URL

from retrieval.config import Settings

SUPERUSER = "famsearch"  # the cluster's superuser (a database role, not a system account)
_SERVER_OPTIONS = "-c listen_addresses='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off"


def server_bindir() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else `pg_config --bindir`, else Debian's newest
    /usr/lib/postgresql/N/bin; None where no server is installed (only the client, or nothing)."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    pg_config = shutil.which("pg_config")
    if pg_config:
        candidates.append(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip())
    found = [Path(c) for c in reversed(candidates) if (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file()]
    return found[0] if found else None


def _server_account() -> pwd.struct_passwd | None:
    """The account the server runs as: None (this one) unless we are root, which PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' account exists to run PostgreSQL")


class PostgresServer:
    """One throwaway cluster: `start()`, `create_database()` -> SQLAlchemy URL, `drop_database(url)`, `stop()`."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.folder = Path(tempfile.mkdtemp(prefix="famsearch-pg-"))  # short: a socket path has ~100 chars
        self.data = self.folder / "data"
        self.account = _server_account()
        self._names = itertools.count()

    def _run(self, *argv: str) -> None:
        kwargs = {}
        if self.account is not None:
            kwargs = dict(user=self.account.pw_uid, group=self.account.pw_gid, extra_groups=[])
        result = subprocess.run(
            [str(self.bindir / argv[0]), *argv[1:]], capture_output=True, text=True, cwd=self.folder, **kwargs
        )
        if result.returncode != 0:
            log = self.folder / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{argv[0]} exited {result.returncode}: {result.stderr.strip()}\n{tail}")

    def start(self) -> PostgresServer:
        if self.account is not None:
            os.chown(self.folder, self.account.pw_uid, self.account.pw_gid)
            self.folder.chmod(0o755)  # the test process (root) reaches the socket; others may list it
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--no-sync", "-E", "UTF8",
                  "--locale=C")  # fmt: skip
        options = f"-k {self.folder} {_SERVER_OPTIONS}"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"), "-o", options, "-w", "start")
        return self

    def url(self, database: str = "postgres") -> str:
        """A psycopg URL of a database on this server, over its Unix socket."""
        return URL.create(
            "postgresql+psycopg", username=SUPERUSER, database=database, query={"host": str(self.folder)}
        ).render_as_string(hide_password=False)

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host=str(self.folder), user=SUPERUSER, dbname="postgres", autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self) -> str:
        """A new, empty database; returns its URL. It sorts text as a server set up for English does (ICU en-US:
        'a' < 'B' < '_c'), not by code point as the test cluster's C locale would, so that an ORDER BY that
        differs from SQLite's shows."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        self._admin(f"CREATE DATABASE \"{name}\" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database made by `create_database`, ending any connection still open to it."""
        from sqlalchemy.engine import make_url

        self._admin(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


class Databases:
    """Where each home keeps its metadata in the running test: SQLite in the home (the CLI's default), or, under
    the `database` fixture's postgresql case, a PostgreSQL database of its own, made on first use.

    `run_cli` (and test_crash's subprocesses) give every command that names a `--home` its database's `--db`, so a
    test of a module that takes `database` runs each command, unchanged, against both backends.
    """

    def __init__(self) -> None:
        self.server: PostgresServer | None = None
        self.urls: dict[Path, str] = {}

    def url(self, home: Path | str) -> str | None:
        """The `--db` URL of `home`; None on SQLite (the file in the home)."""
        if self.server is None:
            return None
        home = Path(home).absolute()
        if home not in self.urls:
            self.urls[home] = self.server.create_database()
        return self.urls[home]

    def settings(self, home: Path | str) -> Settings:
        return Settings(home=Path(home), db_url=self.url(home))

    def with_db(self, argv: list[str]) -> list[str]:
        """`argv` plus `--db URL` of its `--home`, when it names one and its home is in PostgreSQL."""
        if self.server is None or "--home" not in argv or "--db" in argv:
            return argv
        url = self.url(argv[argv.index("--home") + 1])
        assert url is not None
        return [*argv, "--db", url]

    def use(self, server: PostgresServer | None) -> None:
        for url in self.urls.values():
            assert self.server is not None
            self.server.drop_database(url)
        self.server, self.urls = server, {}


# The one registry: it lives here rather than in conftest.py, which pytest imports as `conftest` while test
# modules import it as `tests.conftest` (two module objects, two registries).
DATABASES = Databases()
