"""A private Orthanc PACS on loopback, for trying the app on DICOMweb (``tact orthanc``, ``make orthanc``, tests).

Orthanc is Debian's (``apt-get install orthanc orthanc-dicomweb``); this module writes
its configuration into a folder of its own, starts ``Orthanc`` on it and stops it again.
Nothing of the system-wide Orthanc (``/etc/orthanc``, ``/var/lib/orthanc``) is used or
touched, so several can run beside each other on different ports.

The server it starts:

* accepts HTTP only from this machine (``RemoteAccessAllowed: false``; Orthanc has no
  bind-address setting, so the port is open, but requests from elsewhere are refused);
* serves DICOMweb (QIDO-RS, WADO-RS, STOW-RS) at ``http://127.0.0.1:PORT/dicom-web``;
* runs no DICOM (DIMSE) listener unless a ``dicom_port`` is given;
* keeps its database and files in ``<folder>/storage``, its log in ``<folder>/orthanc.log``.

Example::

    with OrthancServer("runs/orthanc", http_port=8042) as pacs:
        print(pacs.dicomweb_url)          # http://127.0.0.1:8042/dicom-web
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import requests

from training.errors import DataError
from training.fileio import atomic_path

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8042
DICOMWEB_ROOT = "/dicom-web/"
EXECUTABLES = ("Orthanc", "/usr/sbin/Orthanc")
DICOMWEB_PLUGINS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                    "/usr/lib/orthanc/libOrthancDicomWeb.so")
INSTALL_HINT = "install it with `apt-get install orthanc orthanc-dicomweb` (Debian/Ubuntu)"


def find_orthanc() -> tuple[str, str]:
    """The Orthanc executable and its DICOMweb plugin.

    Raises:
        DataError: if either is missing, saying how to install them.
    """
    executable = next((found for name in EXECUTABLES if (found := shutil.which(name))), None)
    if executable is None:
        raise DataError(None, f"Orthanc is not installed (no `Orthanc` on PATH or in /usr/sbin); {INSTALL_HINT}")
    plugin = next((path for path in DICOMWEB_PLUGINS if Path(path).exists()), None)
    if plugin is None:
        raise DataError(None, f"Orthanc's DICOMweb plugin is not installed (looked for {', '.join(DICOMWEB_PLUGINS)}); "
                              f"{INSTALL_HINT}")
    return executable, plugin


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def orthanc_configuration(folder: Path, http_port: int, plugin: str, dicom_port: int | None = None,
                          lua_scripts: tuple[str, ...] = ()) -> dict[str, Any]:
    """The configuration of a private Orthanc in ``folder`` (see the module docstring)."""
    storage = str(folder / "storage")
    return {
        "Name": "TaskAdaptiveCT-PACS",
        "StorageDirectory": storage,
        "IndexDirectory": storage,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,  # loopback only; see the README before exposing a PACS
        "HttpDescribeErrors": True,
        "DicomServerEnabled": dicom_port is not None,
        "DicomPort": dicom_port or 4242,
        "DicomAet": "TACTPACS",
        "WebDavEnabled": False,
        "ExecuteLuaEnabled": False,
        "OverwriteInstances": False,
        "StableAge": 2,
        "SaveJobs": False,
        "MetricsEnabled": False,
        "LuaScripts": list(lua_scripts),
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT, "EnableWado": True, "WadoRoot": "/wado",
                     "Host": f"{HOST}:{http_port}", "Ssl": False,
                     # full metadata from the index, so viewers need not open every file
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
    }


class OrthancServer:
    """An Orthanc process on ``127.0.0.1:http_port`` with its own configuration and storage in ``folder``.

    Args:
        folder: holds ``orthanc.json``, ``storage/`` and ``orthanc.log``; created if absent.
            A folder used before keeps its stored studies.
        http_port: the HTTP (REST and DICOMweb) port.
        dicom_port: a DICOM (C-STORE/C-FIND) port, or ``None`` for no DIMSE listener.
        lua_scripts: Lua files Orthanc runs (e.g. a ``ReceivedInstanceFilter``).
        start_timeout: seconds to wait for Orthanc to answer after starting it.
    """

    def __init__(self, folder: str | Path, http_port: int = DEFAULT_HTTP_PORT, dicom_port: int | None = None,
                 lua_scripts: tuple[str | Path, ...] = (), start_timeout: float = 60.0) -> None:
        if not 1 <= http_port <= 65535:
            raise ValueError(f"http_port must be a TCP port (1-65535), got {http_port}")
        self.folder = Path(folder).resolve()
        self.http_port = http_port
        self.dicom_port = dicom_port
        self.lua_scripts = tuple(str(Path(s).resolve()) for s in lua_scripts)
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """Orthanc's REST API, e.g. ``http://127.0.0.1:8042``."""
        return f"http://{HOST}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root to give ``monailabel start_server --studies``."""
        return self.url + DICOMWEB_ROOT.rstrip("/")

    @property
    def log_path(self) -> Path:
        return self.folder / "orthanc.log"

    def start(self) -> OrthancServer:
        """Write the configuration, start Orthanc and wait until it answers.

        Raises:
            DataError: Orthanc or its DICOMweb plugin is not installed, the port is taken,
                or Orthanc exited or did not answer in time (with the end of its log).
        """
        if self.process is not None and self.process.poll() is None:
            return self
        executable, plugin = find_orthanc()
        if not port_is_free(self.http_port):
            raise DataError(None, f"port {self.http_port} is in use (another Orthanc?); choose another with --port")
        if self.dicom_port is not None and not port_is_free(self.dicom_port):
            raise DataError(None, f"DICOM port {self.dicom_port} is in use; choose another")
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "storage").mkdir(exist_ok=True)
        config = self.folder / "orthanc.json"
        with atomic_path(config) as tmp:
            tmp.write_text(json.dumps(orthanc_configuration(self.folder, self.http_port, plugin, self.dicom_port,
                                                            self.lua_scripts), indent=2))
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen([executable, str(config)], stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.folder)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                raise DataError(self.log_path, f"Orthanc exited at start-up:\n{self.log_tail()}")
            if self.answers():
                log.info("Orthanc %s answers at %s (storage %s)", executable, self.url, self.folder / "storage")
                return self
            time.sleep(0.2)
        self.stop()
        raise DataError(self.log_path, f"Orthanc did not answer within {self.start_timeout:g} s:\n{self.log_tail()}")

    def answers(self) -> bool:
        try:
            return requests.get(self.url + "/system", timeout=2).ok
        except requests.RequestException:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """Stop Orthanc (SIGTERM, which it handles by closing its database cleanly; SIGKILL after ``timeout``)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("Orthanc did not stop within %g s of SIGTERM; killing it", timeout)
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
