"""Run the dashboard: bind its address here (so a port in use is one clear line, and --port 0 takes a free one),
then serve under uvicorn until interrupted."""

from __future__ import annotations

import ipaddress
import socket
from typing import Callable

from ..errors import QuantkitError
from .app import DashboardOptions, make_app


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        raise QuantkitError(f"cannot serve the dashboard on {host}:{port}: {e.strerror or e}",
                            "pass another --port (0 takes a free one), or stop what listens there") from None
    return sock


def serve(options: DashboardOptions, say: Callable[[str], None] = print) -> None:
    import uvicorn

    app = make_app(options)
    sock = listen(options.host, options.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    say(f"quantkit dashboard at http://{shown}:{port}/ (Ctrl+C stops it)")
    if not is_loopback(options.host):
        say(f"note: {options.host} is reachable from other machines, and the dashboard has no login: anyone who "
            "reaches it sees the jobs and builds")
    # Access lines off: a dashboard that polls every 2 s would fill the terminal; errors still show.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    server.run(sockets=[sock])
