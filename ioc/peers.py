"""The pvAccess server's client connections, seen from the kernel, and a way to drop one.

Hand-written because pvxs keeps as many updates for a subscriber as its pvRequest asks
(``record[queueSize=100000]``: any size honoured, no server-side cap) and p4p gives no handle on
a connection: a client that stops reading (frozen, SIGSTOPped, on a dead link) holds one image
per frame in the IOC until pvxs's connection timeout (40 s by default). Its socket is in this
process, so the memory guard finds it here by its send queue, which stays full while the peer
reads nothing, and shuts it down: pvxs sees the connection end and frees everything it queued.
Linux only (``/proc``); elsewhere no peer is ever found and nothing is dropped.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: a send queue at least this full in every sample is a peer that is not reading
STALL_BYTES = 256 * 1024


@dataclass(frozen=True)
class Peer:
    """One accepted TCP connection of our server: its descriptor, address and send queue."""

    fd: int
    address: str  # "host:port"
    send_queue: int  # bytes written but not yet acknowledged by the peer


def _address(hexaddr: str) -> str:
    """``/proc/net/tcp`` "0100007F:DBEC" (or the 32-digit IPv6 form) -> "127.0.0.1:56300"."""
    host, port = hexaddr.rsplit(":", 1)
    raw = bytes.fromhex(host)
    # the kernel prints each 32-bit word in host order (little-endian here)
    words = struct.unpack(f"<{len(raw) // 4}I", raw)
    packed = struct.pack(f">{len(words)}I", *words)
    ip = ipaddress.ip_address(packed)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return f"{ip}:{int(port, 16)}"


def _established() -> dict[int, tuple[int, str, int]]:
    """{socket inode: (local port, remote address, send queue)} of established TCP sockets."""
    table: dict[int, tuple[int, str, int]] = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] != "01":  # 01: ESTABLISHED
                continue
            table[int(f[9])] = (int(f[1].rsplit(":", 1)[1], 16), f[2],
                                int(f[4].split(":")[0], 16))
    return table


def server_peers(port: int) -> list[Peer]:
    """The connections this process accepted on TCP ``port`` (our pvAccess server's)."""
    table = _established()
    peers = []
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return []
    for name in fds:
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if not link.startswith("socket:["):
            continue
        entry = table.get(int(link[8:-1]))
        if entry and entry[0] == port:
            peers.append(Peer(int(name), _address(entry[1]), entry[2]))
    return peers


def drop(peer: Peer) -> None:
    """End the connection at once (RST, queued data discarded); pvxs sees it close and frees
    what it held for that client. The client reconnects when it reads again."""
    s = socket.socket(fileno=os.dup(peer.fd))  # a duplicate: closing it leaves pvxs's fd alone
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.shutdown(socket.SHUT_RDWR)
    finally:
        s.close()


class StallWatch:
    """Remembers, per connection, how many samples in a row its send queue stayed full."""

    def __init__(self, port: int, stall_bytes: int = STALL_BYTES, samples: int = 3) -> None:
        self.port, self.stall_bytes, self.samples = int(port), int(stall_bytes), int(samples)
        self._full: dict[tuple[int, str], int] = {}

    def sample(self) -> list[Peer]:
        """Look once; return the peers whose send queue was full in the last ``samples`` looks."""
        full: dict[tuple[int, str], int] = {}
        stalled = []
        for p in server_peers(self.port):
            if p.send_queue >= self.stall_bytes:
                key = (p.fd, p.address)
                full[key] = self._full.get(key, 0) + 1
                if full[key] >= self.samples:
                    stalled.append(p)
        self._full = full
        return stalled
