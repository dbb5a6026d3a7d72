"""A DICOMweb server: its URL, the credentials (never printed), TLS, and its failures as clear messages.

- :func:`connect` ``(url, insecure=False, timeout=30)``: a :class:`Server` (a ``dicomweb_client.DICOMwebClient``
  over a ``requests`` session) with the credentials of the environment:
  ``LIDC_CDAM_PACS_TOKEN`` (a bearer token), else ``LIDC_CDAM_PACS_USER`` / ``LIDC_CDAM_PACS_PASSWORD`` (HTTP basic
  auth), else the netrc file's entry for the host (``$NETRC`` or ``~/.netrc``), else none. A URL that carries
  credentials (``user:password@``) is refused: they would show in the process list and the shell history.
  TLS certificates are verified unless ``insecure``.
- :func:`public_url`: a URL as it may be shown or written (no credentials, no query).
- :func:`calling` ``(what, server)``: a context manager that turns the server's failures (down, timed out, TLS,
  401, 403, 404, 409...) into a :class:`PacsError` saying what failed and where.

Credentials live only in the session's ``auth`` object, whose ``repr`` hides them; no message, log line or
output file of lidc-cdam contains them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from lidc_cdam.ct.errors import CTError

ENV_USER = "LIDC_CDAM_PACS_USER"
ENV_PASSWORD = "LIDC_CDAM_PACS_PASSWORD"
ENV_TOKEN = "LIDC_CDAM_PACS_TOKEN"
DEFAULT_TIMEOUT = 30.0

log = logging.getLogger("lidc_cdam.pacs")


class PacsError(CTError):
    """A PACS that cannot be reached, refuses, or does not have what was asked for: a clear message."""


def quiet_libraries() -> None:
    """dicomweb-client logs every request at INFO, pynetdicom every step and every failure that lidc-cdam reports
    itself: keep them to warnings and to critical errors unless configured."""
    for name, level in (("dicomweb_client", logging.WARNING), ("pynetdicom", logging.CRITICAL)):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)


def public_url(url: str) -> str:
    """``url`` without credentials, query or fragment: what may be printed or written."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Bearer:
    """``Authorization: Bearer`` for requests (its repr hides the token)."""

    def __init__(self, token: str):
        self._token = token

    def __call__(self, request: Any) -> Any:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "<bearer token>"


class _Basic:
    """HTTP basic auth for requests (its repr hides the user and password)."""

    def __init__(self, user: str, password: str):
        from requests.auth import HTTPBasicAuth

        self._auth = HTTPBasicAuth(user, password)

    def __call__(self, request: Any) -> Any:
        return self._auth(request)

    def __repr__(self) -> str:
        return "<basic auth>"


def credentials(url: str) -> tuple[Any, str]:
    """The auth object for ``url`` and where it came from (``"LIDC_CDAM_PACS_TOKEN"``, ``"LIDC_CDAM_PACS_USER"``,
    ``"netrc"`` or ``"none"``); never the secret itself."""
    token = os.environ.get(ENV_TOKEN)
    if token:
        return _Bearer(token), ENV_TOKEN
    user, password = os.environ.get(ENV_USER), os.environ.get(ENV_PASSWORD)
    if user or password:
        if not (user and password):
            missing = ENV_PASSWORD if user else ENV_USER
            raise PacsError(f"{ENV_USER} and {ENV_PASSWORD} go together: {missing} is not set")
        return _Basic(user, password), ENV_USER
    from requests.utils import get_netrc_auth

    found = get_netrc_auth(url)
    if found:
        return _Basic(*found), "netrc"
    return None, "none"


@dataclass
class Server:
    """A DICOMweb server: ``client`` (``dicomweb_client.DICOMwebClient``), its public URL, where its credentials
    came from, the timeout, and counters of WADO-RS requests and bytes received (for tests and reports)."""

    client: Any
    url: str
    auth_source: str
    timeout: float
    insecure: bool = False
    counts: dict[str, int] = field(default_factory=lambda: {"wado_requests": 0, "qido_requests": 0,
                                                            "stow_requests": 0})

    def __repr__(self) -> str:
        return f"Server({self.url!r}, credentials from {self.auth_source})"


def connect(url: str, *, insecure: bool = False, timeout: float = DEFAULT_TIMEOUT) -> Server:
    """A :class:`Server` for the DICOMweb root ``url`` (e.g. ``https://pacs.example.org/dicom-web``)."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    quiet_libraries()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PacsError(f"{url!r}: not a DICOMweb URL (http:// or https://, e.g. https://pacs.example.org/dicom-web)")
    if parts.username or parts.password:
        raise PacsError(f"{public_url(url)}: the URL carries credentials (user:password@); give them in {ENV_USER} / "
                        f"{ENV_PASSWORD}, {ENV_TOKEN} or a netrc file instead, never on the command line")
    auth, source = credentials(url)
    if auth is not None and parts.scheme == "http" and not _loopback(parts.hostname):
        log.warning("%s: credentials (from %s) go unencrypted over http://; use https://", public_url(url), source)
    session = requests.Session()
    session.auth = auth
    session.verify = not insecure
    if insecure:
        import urllib3

        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    try:
        client = DICOMwebClient(base, session=session, timeout=timeout)
    except ValueError as err:
        raise PacsError(f"{public_url(url)}: not a usable DICOMweb URL ({err})") from None
    client.set_http_retry_params(retry=False)  # a failure is reported at once, and a STOW is never sent twice
    server = Server(client, public_url(url), source, timeout, insecure)

    def count(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        method, path = response.request.method, urlsplit(response.request.url or "").path
        kind = "stow" if method == "POST" else "qido" if path.rstrip("/").endswith(("/studies", "/series",
                                                                                   "/instances")) else "wado"
        server.counts[f"{kind}_requests"] += 1
        return response

    session.hooks["response"].append(count)
    return server


def _status_text(server: Server, status: int) -> str:
    if status == 401:
        how = ("no credentials were given: set " + f"{ENV_USER} / {ENV_PASSWORD}, {ENV_TOKEN} or a netrc entry"
               if server.auth_source == "none" else f"the credentials (from {server.auth_source}) were refused")
        return f"401 Unauthorized: {how}"
    return {403: "403 Forbidden: this user may not do this here",
            404: "404 Not Found",
            409: "409 Conflict: the server refused the instances (already stored differently, or not acceptable)",
            413: "413 Payload Too Large",
            }.get(status, f"HTTP {status}")


@contextlib.contextmanager
def calling(what: str, server: Server) -> Iterator[None]:
    """Run a request to ``server``; its failures become a :class:`PacsError` ``"<url>: <what> failed: <why>"``."""
    import requests

    try:
        yield
    except PacsError:
        raise
    except requests.exceptions.SSLError:
        raise PacsError(f"{server.url}: {what} failed: the server's TLS certificate could not be verified (use "
                        "--insecure only for a server you trust, e.g. a self-signed test server)") from None
    except requests.exceptions.Timeout:
        raise PacsError(f"{server.url}: {what} failed: no answer within {server.timeout:g} s (timed out)") from None
    except requests.exceptions.ConnectionError:
        raise PacsError(f"{server.url}: {what} failed: cannot connect (the server is down, or the URL or port is "
                        "wrong)") from None
    except requests.exceptions.HTTPError as err:
        status = err.response.status_code if err.response is not None else 0
        raise PacsError(f"{server.url}: {what} failed: {_status_text(server, status)}") from None
    except requests.exceptions.RequestException as err:
        raise PacsError(f"{server.url}: {what} failed: {type(err).__name__}") from None
