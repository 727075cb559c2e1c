"""Real servers for tests, on 127.0.0.1 and stopped at the end: PostgreSQL (Debian's `postgresql`, its own data
folder in a temp dir) and an MLflow tracking server on it (`mlflow server --backend-store-uri postgresql://...`).

The commands are the ones docs/mlflow.md gives for a team server. `.ci/run` installs PostgreSQL; a developer
machine without it skips these tests (MEDSEG_REQUIRE_SERVICES=1, set by .ci/run, turns the skip into a failure).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unavailable(reason: str):
    """Skip, or fail where CI promised the service (MEDSEG_REQUIRE_SERVICES=1)."""
    if os.environ.get("MEDSEG_REQUIRE_SERVICES") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def postgres_bin() -> Path | None:
    """The folder with initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<major>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    return Path(folders[-1]) if folders and (Path(folders[-1]) / "initdb").is_file() else None


class Postgres:
    """A throwaway cluster: trust authentication on 127.0.0.1 only, one database `mlflow`."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        if self.bin is None:
            unavailable("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        self.folder = Path(tempfile.mkdtemp(prefix="medseg-pg-"))
        self.port = free_port()
        self.user = "medseg"
        # PostgreSQL refuses to run as root: then as Debian's `postgres` user, owning the cluster's folder
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                unavailable("running as root without runuser: cannot start PostgreSQL as another user")
            shutil.chown(self.folder, "postgres", "postgres")
            self.prefix = ["runuser", "-u", "postgres", "--"]

    def database_uri(self, database: str) -> str:
        """The SQLAlchemy URI `mlflow server --backend-store-uri` takes (psycopg 3, SQLAlchemy's default driver)."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, database: str) -> str:
        import psycopg

        with psycopg.connect(f"postgresql://{self.user}@127.0.0.1:{self.port}/mlflow", autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{database}"')
        return self.database_uri(database)

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/mlflow"

    def _run(self, *cmd: str) -> None:
        done = subprocess.run([*self.prefix, *cmd], capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def start(self) -> "Postgres":
        data = self.folder / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-U", self.user, "-A", "trust", "--no-sync")
        self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.folder / "server.log"), "-w", "-o",
                  f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off", "start")
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "mlflow")
        return self

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


class MlflowServer:
    """`mlflow server` on a database, proxying artifacts to a folder; kill() and start() again on the same port."""

    def __init__(self, backend_uri: str, artifacts: Path, log: Path) -> None:
        self.backend_uri, self.artifacts, self.log = backend_uri, artifacts, log
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
                "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", "1"]

    def start(self, timeout: float = 120) -> "MlflowServer":
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.log, "a") as out:  # its own session: kill() stops the server and its workers together
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.process.returncode}): {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"mlflow server did not answer within {timeout} s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL, as a crashed machine would: no shutdown, no flushing."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None


# ------------------------------------------------------------------------------------------------ Orthanc (a PACS)

ORTHANC_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
REFUSE_SEG_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  -- a PACS whose policy refuses segmentations (as a full disk or a read-only archive would refuse them)
  if dicom.Modality == 'SEG' then
    return false
  end
  return true
end
"""


class Orthanc:
    """Debian's Orthanc with its DICOMweb plugin on 127.0.0.1 (remote access off, no DICOM port), its database in a
    temp folder; `refuse_seg`: a Lua filter that refuses every SEG, as a PACS that will not store one."""

    def __init__(self, refuse_seg: bool = False, users: dict[str, str] | None = None) -> None:
        binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
        plugin = next((f"{d}/libOrthancDicomWeb.so" for d in ORTHANC_PLUGIN_DIRS
                       if os.path.exists(f"{d}/libOrthancDicomWeb.so")), None)
        if binary is None or plugin is None:
            unavailable("Orthanc with its DICOMweb plugin is not installed (Debian: apt-get install orthanc "
                        "orthanc-dicomweb)")
        self.folder = Path(tempfile.mkdtemp(prefix="medseg-orthanc-"))
        self.port = free_port()
        config = {
            "Name": "medseg-tests", "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"), "HttpPort": self.port, "DicomServerEnabled": False,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {},
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        }
        if refuse_seg:
            (self.folder / "refuse_seg.lua").write_text(REFUSE_SEG_LUA)
            config["LuaScripts"] = [str(self.folder / "refuse_seg.lua")]
        (self.folder / "orthanc.json").write_text(__import__("json").dumps(config))
        self.log = self.folder / "orthanc.log"
        self.binary = binary
        self.process: subprocess.Popen | None = None

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.rest}/dicom-web"

    def start(self, timeout: float = 60) -> "Orthanc":
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([self.binary, str(self.folder / "orthanc.json")], stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                request = urllib.request.Request(f"{self.rest}/system", headers=self._headers())
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on {self.rest} within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def _headers(self) -> dict[str, str]:
        users = __import__("json").loads((self.folder / "orthanc.json").read_text()).get("RegisteredUsers") or {}
        if not users:
            return {}
        user, password = next(iter(users.items()))
        token = __import__("base64").b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def upload(self, files: list[Path]) -> None:
        """Store DICOM files through Orthanc's REST API (as a modality's C-STORE would)."""
        for path in files:
            request = urllib.request.Request(f"{self.rest}/instances", data=Path(path).read_bytes(), method="POST",
                                             headers={"Content-Type": "application/dicom", **self._headers()})
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 200, f"Orthanc refused {path}: {response.status}"

    def get(self, path: str) -> object:
        request = urllib.request.Request(f"{self.rest}{path}", headers=self._headers())
        with urllib.request.urlopen(request, timeout=30) as response:
            return __import__("json").loads(response.read())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
