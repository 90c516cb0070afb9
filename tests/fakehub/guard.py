"""A process-wide audit hook that refuses socket connections and name lookups outside loopback while
armed (audit hooks cannot be removed, so the hook is installed once and toggled)."""
from __future__ import annotations

import ipaddress
import sys
import threading

_state = {"armed": 0, "installed": False, "violations": []}
_lock = threading.Lock()
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", None, ""}


def _is_loopback(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _hook(event, args):
    if not _state["armed"]:
        return
    host = None
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and address:
            host = address[0]
        else:
            return  # AF_UNIX and friends stay local
    elif event == "socket.getaddrinfo":
        host = args[0]
    else:
        return
    if not _is_loopback(host):
        _state["violations"].append((event, host))
        raise ConnectionRefusedError(f"test network guard: connection to {host!r} refused (loopback only)")


def arm() -> None:
    with _lock:
        if not _state["installed"]:
            sys.addaudithook(_hook)
            _state["installed"] = True
        _state["armed"] += 1


def disarm() -> list:
    """Disarm once; return (and clear) the refused attempts seen since arming."""
    with _lock:
        _state["armed"] = max(0, _state["armed"] - 1)
        seen, _state["violations"] = list(_state["violations"]), []
        return seen
