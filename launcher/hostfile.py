"""DeepSpeed hostfiles, parsed strictly: nothing that is not a plain host name or address
ever reaches pdsh, ssh or a shell.

Format (DeepSpeed's): one `hostname slots=N` per line, `#` starts a comment.
"""

from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import ConfigError
from moelab.config import ClusterConfig

HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\S+)$")
SLOTS = re.compile(r"^[0-9]+$")
MAX_BYTES = 1024 * 1024
MAX_RANKS_PER_HOST = 1024
"""Ranks (processes) one host may start: hostfile slots, cluster.nproc_per_node."""
MAX_HOSTS = 10_000


def is_plain_host(name: str) -> bool:
    """A DNS host name (labels of letters, digits, `-`, `_`) or an IPv4/IPv6 address."""
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    labels = name.split(".")
    return len(name) <= 253 and all(HOST_LABEL.match(label) for label in labels)


def _parse_line(raw: str, where: str) -> tuple[str, int] | None:
    text = raw.split("#", 1)[0].strip()
    if not text:
        return None
    match = LINE.match(text)
    if match is None:
        raise ConfigError(f"{where}: expected `hostname slots=N`, got {text!r}.")
    host, slots = match["host"], match["slots"]
    if not is_plain_host(host):
        raise ConfigError(f"{where}: {host!r} is not a plain host name or IP address.")
    digits = slots.lstrip("0")  # int() refuses a string of over 4300 digits
    if not SLOTS.match(slots) or not digits:
        raise ConfigError(f"{where}: slots={slots} must be a positive whole number.")
    if len(digits) > 6 or int(digits) > MAX_RANKS_PER_HOST:
        raise ConfigError(
            f"{where}: slots={slots} is above the limit of {MAX_RANKS_PER_HOST} ranks per host; "
            "lower it."
        )
    return host, int(digits)


def _read(p: Path) -> list[str]:
    """The hostfile's lines; ConfigError when it is too large or not UTF-8 text."""
    if p.stat().st_size > MAX_BYTES:
        raise ConfigError(
            f"cluster.hostfile={p} is larger than {MAX_BYTES // 1024} KiB; give a hostfile of "
            "`hostname slots=N` lines."
        )
    try:
        return p.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"cluster.hostfile={p} is not UTF-8 text; give a hostfile.") from None


def parse_hostfile(path: str | Path) -> OrderedDict[str, int]:
    """Host -> slots, in file order; ConfigError on any malformed line or duplicate host."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"cluster.hostfile={path} does not exist; give a hostfile path.")
    hosts: OrderedDict[str, int] = OrderedDict()
    for n, raw in enumerate(_read(p), start=1):
        entry = _parse_line(raw, f"cluster.hostfile line {n}")
        if entry is None:
            continue
        host, slots = entry
        if host in hosts:
            raise ConfigError(f"cluster.hostfile line {n}: host {host} is listed twice.")
        hosts[host] = slots
        if len(hosts) > MAX_HOSTS:
            raise ConfigError(
                f"cluster.hostfile={path} lists more than {MAX_HOSTS} hosts, the limit; "
                "split the cluster."
            )
    if not hosts:
        raise ConfigError(f"cluster.hostfile={path} lists no hosts; add `hostname slots=N`.")
    return hosts


@dataclass(frozen=True)
class Resources:
    """The hosts and slots a launch will use, after include/exclude/num_nodes."""

    hosts: OrderedDict[str, list[int]]

    @property
    def world_size(self) -> int:
        return sum(len(s) for s in self.hosts.values())

    @property
    def first_host(self) -> str:
        return next(iter(self.hosts))


def _check_filter(key: str, spec: str, pool: OrderedDict[str, int]) -> None:
    for node in filter(None, spec.split("@")):
        host = node.split(":", 1)[0]
        if host not in pool:
            raise ConfigError(f"{key}={spec!r} names host {host!r}, which the hostfile lacks.")


def filtered(pool: OrderedDict[str, int], include: str, exclude: str) -> dict[str, list[int]]:
    """Each host's slots left by DeepSpeed's own include/exclude parser. Without a filter that
    parser returns every slot, and DeepSpeed (torch, seconds to import) is not loaded for it."""
    if not include and not exclude:
        return OrderedDict((host, list(range(slots))) for host, slots in pool.items())
    from deepspeed.launcher.runner import parse_inclusion_exclusion

    try:
        active: dict[str, list[int]] = parse_inclusion_exclusion(pool, include, exclude)
    except ValueError as err:
        raise ConfigError(f"cluster.include/exclude: {err}.") from None
    return active


def active_resources(cluster: ClusterConfig) -> Resources:
    """Apply DeepSpeed's own include/exclude parser and num_nodes to the hostfile."""
    assert cluster.hostfile is not None
    pool = parse_hostfile(cluster.hostfile)
    _check_filter("cluster.include", cluster.include, pool)
    _check_filter("cluster.exclude", cluster.exclude, pool)
    if cluster.include and cluster.exclude:
        raise ConfigError("cluster.include and cluster.exclude are exclusive; set only one.")
    active = filtered(pool, cluster.include, cluster.exclude)
    hosts = OrderedDict((h, list(s)) for h, s in active.items() if s)
    if cluster.num_nodes > 0:
        if cluster.num_nodes > len(hosts):
            raise ConfigError(
                f"cluster.num_nodes={cluster.num_nodes} exceeds the {len(hosts)} hosts "
                "of the hostfile; lower it."
            )
        hosts = OrderedDict(list(hosts.items())[: cluster.num_nodes])
    if not hosts:
        raise ConfigError("cluster.include/exclude leave no host; loosen the filter.")
    return Resources(hosts)
