"""`--listen` addresses: `HOST:PORT`, `:PORT` (every IPv4 interface) or `[IPV6]:PORT`.

The exporter reads its `--listen` by the same rules with its own small parser
(`exporter/web.py`): the two deployables share no code, and one table of cases tests both.
An IPv6 address must be in brackets, since `::1:9643` could be read two ways.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from recommender.text import HOST_NAME

_PORT = re.compile(r"[0-9]{1,5}")
EXPECTED = "expected HOST:PORT, :PORT or [IPV6]:PORT"


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int
    family: socket.AddressFamily


def parse_listen(listen: str) -> ListenAddress:
    """The address to bind; ValueError with one line when `listen` is not one."""
    host, sep, port = listen.rpartition(":")
    if not sep or not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise ValueError(f"{listen!r}: {EXPECTED} (port 1-65535)")
    if host.startswith("[") and host.endswith("]"):
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{listen!r}: {host} is not an IPv6 address") from None
        return ListenAddress(str(address), int(port), socket.AF_INET6)
    if ":" in host:
        raise ValueError(f"{listen!r}: write an IPv6 address in brackets, e.g. [::1]:{port}")
    if host and not HOST_NAME.fullmatch(host):
        raise ValueError(f"{listen!r}: {host!r} is not a host name or address; {EXPECTED}")
    return ListenAddress(host or "0.0.0.0", int(port), socket.AF_INET)


__all__ = ["EXPECTED", "ListenAddress", "parse_listen"]
