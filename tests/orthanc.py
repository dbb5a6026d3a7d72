"""A real Orthanc PACS for the tests: started as a plain process on free loopback ports, stopped and removed after.

The ``orthanc`` fixture (module scope) writes a JSON configuration into a temporary folder (storage and index
there), loads the DICOMweb plugin (``/dicom-web/``), turns HTTP authentication on with two users: ``lidc`` (may
read and store) and ``reader`` (a Lua ``IncomingHttpRequestFilter`` refuses anything but GET: a user without
write rights, answered 403), and waits for ``/system``. Where Orthanc or its DICOMweb plugin is missing the tests
are skipped with a reason that says how to install them (Debian: ``apt-get install -y orthanc orthanc-dicomweb``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL = "apt-get install -y orthanc orthanc-dicomweb"
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/local/share/orthanc/plugins")
USERS = {"lidc": "lidc-test-password-7b1e", "reader": "reader-test-password-93c4"}
AET = "ORTHANC"
FILTER_LUA = """
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if method == 'GET' then return true end
  return username ~= 'reader'
end
"""


def orthanc_executable() -> str | None:
    found = shutil.which("Orthanc")
    if found:
        return found
    return "/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None


def dicomweb_plugin() -> str | None:
    return next((f"{d}/libOrthancDicomWeb.so" for d in PLUGIN_DIRS if Path(f"{d}/libOrthancDicomWeb.so").is_file()),
                None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    """A running Orthanc: its REST root, DICOMweb root, DICOM port and AE title, users, process and folder."""

    http: str
    dicomweb: str
    dicom_port: int
    aet: str
    users: dict[str, str]
    process: subprocess.Popen
    folder: Path

    @property
    def scp(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    def get(self, path: str, user: str = "lidc"):
        import requests

        response = requests.get(self.http + path, auth=(user, self.users[user]), timeout=10)
        response.raise_for_status()
        return response.json()

    def log(self) -> str:
        path = self.folder / "orthanc.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def start_orthanc(folder: Path, timeout: float = 30.0) -> Orthanc:
    """Start Orthanc in ``folder`` and wait until ``/system`` answers (RuntimeError with its log otherwise)."""
    import requests

    exe, plugin = orthanc_executable(), dicomweb_plugin()
    assert exe and plugin
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "filter.lua").write_text(FILTER_LUA)
    http_port, dicom_port = free_port(), free_port()
    config = {"Name": "lidc-cdam-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
              "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": AET, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": True, "RegisteredUsers": USERS, "Plugins": [plugin],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "LuaScripts": [str(folder / "filter.lua")],
              "SaveJobs": False, "HttpTimeout": 30}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 (kept open for the process's life)
    process = subprocess.Popen([exe, str(folder / "config.json")], cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    http = f"http://127.0.0.1:{http_port}"
    server = Orthanc(http, f"{http}/dicom-web", dicom_port, AET, dict(USERS), process, folder)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with status {process.returncode}:\n{server.log()}")
        try:
            if requests.get(f"{http}/system", auth=("lidc", USERS["lidc"]), timeout=2).ok:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.2)
    stop_orthanc(server)
    raise RuntimeError(f"Orthanc did not answer /system within {timeout:g} s:\n{server.log()}")


def stop_orthanc(server: Orthanc) -> None:
    """Stop the process (by its own PID) and remove its folder."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=5)
    shutil.rmtree(server.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A running Orthanc with DICOMweb and authentication (see the module docstring); skipped where missing."""
    if orthanc_executable() is None:
        pytest.skip(f"Orthanc is not installed: the PACS tests need a real Orthanc ({INSTALL})")
    if dicomweb_plugin() is None:
        pytest.skip(f"Orthanc's DICOMweb plugin is not installed ({INSTALL})")
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        stop_orthanc(server)
