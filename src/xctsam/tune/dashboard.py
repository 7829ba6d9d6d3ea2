"""`xctsam tune dashboard`: optuna-dashboard on the study storage, for this machine only.

optuna-dashboard runs in this process as a WSGI app (its public `wsgi()`) behind a guard,
served on 127.0.0.1 by wsgiref with a thread per request (optuna-dashboard's own server when
gunicorn is absent). Binding to 127.0.0.1 is not enough: a web page whose domain re-resolves to
127.0.0.1 (DNS rebinding) reaches the server with its own name in the Host header and could
read or delete studies. So, as MLflow's server does, the guard answers 403 to a Host other than
localhost, 127.0.0.1 or [::1] (any port), and to a state-changing request that a page of
another origin sent (a cross-site form post needs no rebinding).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import urlsplit
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from xctsam.tune.results import open_study_storage, read_storage_url
from xctsam.tune.study import TuneError, storage_label
from xctsam.util.interrupt import Interrupted, signals_raise

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


# ---------------------------------------------------------------- the guard
def host_name(host: str) -> str:
    """The name part of a Host header: '127.0.0.1:8080' -> '127.0.0.1', '[::1]:80' -> '[::1]'."""
    name, _, port = host.lower().rpartition(":")
    return name if name and port.isdigit() else host.lower()


def is_local_origin(origin: str) -> bool:
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and host_name(parts.netloc) in LOOPBACK_NAMES


def refusal(environ: dict[str, Any]) -> str | None:
    """Why a request must not reach the dashboard; None when it may."""
    host = environ.get("HTTP_HOST", "")
    if host_name(host) not in LOOPBACK_NAMES:
        return f"Host {host!r} is not this machine (possible DNS rebinding)"
    method = environ.get("REQUEST_METHOD", "GET")
    origin = environ.get("HTTP_ORIGIN")
    if method not in SAFE_METHODS and origin is not None and not is_local_origin(origin):
        return f"{method} from the page of another origin {origin!r} (cross-site request)"
    return None


def loopback_only(app: WSGIApp) -> WSGIApp:
    """`app` for requests from this machine's own pages; 403 for the others."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        reason = refusal(environ)
        if reason is None:
            return app(environ, start_response)
        print(f"refused: {reason}", file=sys.stderr, flush=True)
        body = f"403 Forbidden: {reason}\n".encode()
        start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    return guarded


# ---------------------------------------------------------------- the server
class _ThreadedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a request still being answered does not hold up Ctrl-C


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        """No line per request: the dashboard polls the API every few seconds."""


def bind(port: int) -> WSGIServer:
    """A server listening on 127.0.0.1:`port` (its app set later); one line if the port is taken."""
    try:
        return _ThreadedServer(("127.0.0.1", port), _QuietHandler)
    except OSError as exc:
        raise TuneError(f"127.0.0.1:{port}: cannot serve there ({exc.strerror or exc}); pick another --port") from None


def serve_until_stopped(server: WSGIServer) -> int:
    """Serve until Ctrl-C or SIGTERM, then return 128 + its number (130 for Ctrl-C), as `xctsam ui`
    and every other command do; any other failure propagates, so a crash exits non-zero too."""
    try:
        with signals_raise():
            server.serve_forever()
    except Interrupted as exc:
        return exc.exit_code
    return 0  # serve_forever returns only after a shutdown() that nothing here calls


def serve(storage: str | None, port: int = 8080) -> int:
    """Serve the dashboard of the studies at `storage` until stopped; returns the exit code."""
    opened = open_study_storage(storage)  # refuses a missing or empty storage, creating nothing
    server = bind(port)  # a taken port is refused before the slow part
    try:
        from optuna_dashboard import wsgi  # its import takes seconds (scikit-learn)

        server.set_app(loopback_only(wsgi(opened)))
        label = storage_label(read_storage_url(storage))
        print(f"Optuna dashboard: http://127.0.0.1:{port}  (storage {label}); Ctrl-C stops it", flush=True)
        return serve_until_stopped(server)
    finally:
        server.server_close()
