"""A real PostgreSQL on a free loopback port: initdb and pg_ctl on a temporary directory.

The binaries are found under /usr/lib/postgresql/*/bin (Debian's `postgresql`
package, installed by `make system-deps`). As root, initdb refuses to run:
the server then runs as the `postgres` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "agent_db"
PASSWORD = "s3cret-Canary-7f1c"  # the canary tests search every surface for it
DATABASE = "shop"


def pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sidecar-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as: list[str] = []
        self.ca_pem = ""  # the CA that signed the server's certificate (trustme)
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=60)

    def init(self) -> None:
        initdb = pg_bin("initdb")
        assert initdb, "PostgreSQL is not installed: run make system-deps"
        self._run(
            initdb,
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self._certificate()
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
            f.write("ssl_ca_file = 'root.crt'\n")
            f.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\nfsync = off\n"
                "max_connections = 60\nshared_buffers = 16MB\n"
                "password_encryption = 'scram-sha-256'\n"
            )
        self.start()
        self.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'", database="postgres")
        self.psql(f"CREATE DATABASE {DATABASE} OWNER {USER}", database="postgres")
        self.psql(
            "CREATE TABLE orders (id int PRIMARY KEY, item text, amount numeric);"
            "INSERT INTO orders SELECT g, 'item ' || g, g * 1.5 FROM generate_series(1, 500) g;"
            f"ALTER TABLE orders OWNER TO {USER};",
        )

    def _certificate(self) -> None:
        """A server certificate for 127.0.0.1 and localhost from a throwaway CA."""
        import trustme

        ca = trustme.CA()
        self.ca = ca
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_pem = ca.cert_pem.bytes().decode()
        crt, key = self.data / "server.crt", self.data / "server.key"
        root = self.data / "root.crt"  # clients' certificates (hba `cert`) verify against it
        crt.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        key.write_bytes(cert.private_key_pem.bytes())
        root.write_bytes(ca.cert_pem.bytes())
        os.chmod(key, 0o600)
        if self._as:
            entry = pwd.getpwnam("postgres")
            for path in (crt, key, root):
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self) -> None:
        self._run(
            pg_bin("pg_ctl") or "pg_ctl",
            "-D",
            str(self.data),
            "-w",
            "-l",
            str(self.root / "log"),
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(pg_bin("pg_ctl") or "pg_ctl", "-D", str(self.data), "-w", "-m", mode, "stop")

    def psql(self, sql: str, *, database: str = DATABASE) -> str:
        """As the superuser, over the Unix socket (trust)."""
        result = subprocess.run(
            [
                *self._as,
                pg_bin("psql") or "psql",
                "-h",
                str(self.root),
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return result.stdout

    def set_password(self, password: str) -> None:
        self.psql(f"ALTER ROLE {USER} PASSWORD '{password}'")

    def close(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def client_cert(self, role: str) -> tuple[str, str]:
        """A client certificate for `role` (its common name), PEM (cert, key)."""
        cert = self.ca.issue_cert("client.invalid", common_name=role)
        return cert.cert_chain_pems[0].bytes().decode(), cert.private_key_pem.bytes().decode()

    def add_login(self, role: str, password: str, method: str) -> None:
        """A role that logs in with `method` (md5, password, cert) over TCP: hba line first."""
        encryption = "md5" if method == "md5" else "scram-sha-256"
        self.psql(
            f"SET password_encryption = '{encryption}'; "
            f"CREATE ROLE {role} LOGIN PASSWORD '{password}'; "
            f"GRANT SELECT ON orders TO {role}"
        )
        hba = self.data / "pg_hba.conf"
        kind = "hostssl" if method == "cert" else "host"
        hba.write_text(f"{kind} all {role} 127.0.0.1/32 {method}\n" + hba.read_text())
        self._run(pg_bin("pg_ctl") or "pg_ctl", "-D", str(self.data), "reload")
