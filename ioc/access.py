"""Access security: who may write which PVs, from the ``[access]`` section of the IOC's TOML.

EPICS access security in spirit (groups of PVs, host and user access lists), small enough to
read at a glance. Reads are always allowed; writes are checked on pvAccess (p4p reports the
peer's address and account) and on Channel Access (caproto reports the host and user names
the client sends). A refused write changes nothing, is counted on ``NN:RefusedWrites_RBV``
and logged (rate-limited). Without an ``[access]`` section anyone may write anything, as on a
plain soft IOC, and the IOC says so at start.

Groups (a PV belongs to the first that matches):

* ``model``: ``NN:Model``, ``NN:ModelSelect``, ``Stitch:Probe`` (what changes the results);
* ``qa``: ``QA:*`` (what the continual-learning loop reports);
* ``control``: every other writable PV (callbacks, counters, queue, batch, map settings).

A rule lists ``hosts`` and/or ``users``; a write is allowed when its host is in ``hosts`` and
its user in ``users`` (a list that is absent, or holds ``"*"``, allows anyone). Top-level
``hosts``/``users`` in ``[access]`` are the rule of every group without one of its own, except
``qa``, which takes the ``model`` group's rule: the loop that deploys models is the one that
reports on them.

    [access]
    hosts = ["ctrl-ws1", "10.2.3.0/24"]     # default: operators' consoles
    [access.model]
    users = ["ptycho-loop"]                 # models (and, by default, QA:*) from the loop only
    hosts = ["hpc-gw.example.org"]

Hosts are IP addresses, networks (``10.2.3.0/24``) or host names. pvAccess peers are matched
by address (names are resolved once, at start); Channel Access clients report their host
name themselves, which is matched by name, or by the addresses it resolves to here (as
EPICS CA access security does; like it, this trusts the client's word: use networks the
beamline controls).
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

#: group -> PV suffix patterns, in matching order (control: the rest)
GROUPS: dict[str, tuple[str, ...]] = {
    "model": ("NN:Model", "NN:ModelSelect", "Stitch:Probe"),
    "qa": ("QA:*",),
    "control": ("*",),
}
RULE_KEYS = ("hosts", "users")


class AccessConfigError(ValueError):
    """A mistake in the ``[access]`` section, said in one line."""


def _split_host(peer: str) -> str:
    """'127.0.0.1:5076' -> '127.0.0.1', '[::1]:5076' -> '::1', 'host' -> 'host'."""
    peer = peer.strip()
    if peer.startswith("["):
        return peer[1:].split("]", 1)[0]
    if peer.count(":") == 1:
        return peer.split(":", 1)[0]
    return peer


@functools.lru_cache(maxsize=256)
def _resolve(name: str) -> tuple:
    """The addresses a host name (as a CA client reports it) resolves to here, cached."""
    try:
        return tuple({ipaddress.ip_address(i[4][0]) for i in socket.getaddrinfo(name, None)})
    except (OSError, UnicodeError, ValueError):
        return ()


def _ip(text: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@dataclass
class Rule:
    """Allowed hosts and users; None: anyone."""

    hosts: tuple[str, ...] | None = None
    users: tuple[str, ...] | None = None
    _networks: list = field(default_factory=list, repr=False)
    _names: set = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if self.hosts is None or "*" in self.hosts:
            self.hosts = None
            return
        for h in self.hosts:
            try:
                self._networks.append(ipaddress.ip_network(h, strict=False))
                continue
            except ValueError:
                pass
            self._names.add(h.lower())
            try:  # pvAccess reports addresses: resolve the names once, now
                for info in socket.getaddrinfo(h, None):
                    self._networks.append(ipaddress.ip_network(info[4][0]))
            except (OSError, UnicodeError):
                log.warning("access: host %s does not resolve: it matches Channel Access "
                            "clients that report that name only", h)
        if self.users is not None and "*" in self.users:
            self.users = None

    def allows(self, peer: str, account: str) -> bool:
        if self.users is not None and account not in self.users:
            return False
        if self.hosts is None:
            return True
        host = _split_host(peer)
        ip = _ip(host)
        if ip is not None:
            return any(ip in net for net in self._networks)
        host = host.lower()
        if host in self._names or host.split(".")[0] in {n.split(".")[0] for n in self._names}:
            return True
        return any(ip in net for ip in _resolve(host) for net in self._networks)

    def describe(self) -> str:
        hosts = "any host" if self.hosts is None else "hosts " + ", ".join(self.hosts)
        users = "any user" if self.users is None else "users " + ", ".join(self.users)
        return f"{users} on {hosts}"


OPEN = Rule()


class AccessPolicy:
    """``policy(suffix, peer, account) -> bool``: may ``account`` at ``peer`` write ``suffix``
    (the PVTable's ``access`` hook, used for pvAccess and Channel Access writes alike)."""

    def __init__(self, rules: dict[str, Rule] | None = None) -> None:
        self.rules = {g: (rules or {}).get(g, OPEN) for g in GROUPS}

    @staticmethod
    def group_of(suffix: str) -> str:
        for group, patterns in GROUPS.items():
            if any(fnmatch.fnmatchcase(suffix, p) for p in patterns):
                return group
        return "control"

    def __call__(self, suffix: str, peer: str = "", account: str = "") -> bool:
        return self.rules[self.group_of(suffix)].allows(peer or "", account or "")

    def describe(self) -> str:
        return "; ".join(f"{g}: {r.describe()}" for g, r in self.rules.items())

    @property
    def open(self) -> bool:
        return all(r.hosts is None and r.users is None for r in self.rules.values())

    @classmethod
    def from_config(cls, section: dict | None) -> AccessPolicy | None:
        """The policy of an ``[access]`` TOML table, or None when there is none (everyone
        may write). Raises AccessConfigError naming the mistake."""
        if section is None:
            return None
        if not isinstance(section, dict):
            raise AccessConfigError(f"[access] must be a table, got {section!r}")
        unknown = set(section) - set(RULE_KEYS) - set(GROUPS)
        if unknown:
            raise AccessConfigError(f"unknown keys in [access]: {', '.join(sorted(unknown))} "
                                    f"(groups: {', '.join(GROUPS)}; rule keys: "
                                    f"{', '.join(RULE_KEYS)})")
        default = _rule("access", {k: section[k] for k in RULE_KEYS if k in section})
        rules = {}
        for group in GROUPS:
            if group in section:
                if not isinstance(section[group], dict):
                    raise AccessConfigError(f"[access.{group}] must be a table")
                rules[group] = _rule(f"access.{group}", section[group])
        rules.setdefault("model", default)
        rules.setdefault("control", default)
        rules.setdefault("qa", rules["model"])
        return cls(rules)


def _strings(where: str, key: str, value) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable) or not all(
            isinstance(v, str) and v.strip() for v in value):
        raise AccessConfigError(f"[{where}] {key} must be a list of names, got {value!r}")
    return tuple(v.strip() for v in value)


def _rule(where: str, table: dict) -> Rule:
    unknown = set(table) - set(RULE_KEYS)
    if unknown:
        raise AccessConfigError(f"unknown keys in [{where}]: {', '.join(sorted(unknown))} "
                                f"(expected {', '.join(RULE_KEYS)})")
    hosts = _strings(where, "hosts", table["hosts"]) if "hosts" in table else None
    users = _strings(where, "users", table["users"]) if "users" in table else None
    for h in hosts or ():
        if "/" in h:
            try:
                ipaddress.ip_network(h, strict=False)
            except ValueError as exc:
                raise AccessConfigError(f"[{where}] hosts: {exc}") from None
    return Rule(hosts, users)
