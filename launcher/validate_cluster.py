"""Cluster, tracking and run-dir rules; each backend adds its own (`launcher.backends`)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from urllib.parse import ParseResult, urlparse

from launcher.backends import backend_for
from launcher.backends.sbatch import minutes
from launcher.hostfile import is_plain_host
from launcher.rules import one_of, require
from moelab.config import CLUSTER_BACKENDS, MoelabConfig

IFNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def validate_cluster(cfg: MoelabConfig, planning: bool = False) -> None:
    """Cluster keys; `planning` describes a cluster instead of launching on this one."""
    c = cfg.cluster
    one_of("cluster.backend", c.backend, CLUSTER_BACKENDS)
    require(
        c.gpus_per_node is None or c.gpus_per_node >= 1,
        f"cluster.gpus_per_node={c.gpus_per_node} must be at least 1 (or null).",
    )
    require(c.nproc_per_node >= 1, "cluster.nproc_per_node must be at least 1.")
    require(
        c.device_memory_gb > 0,
        f"cluster.device_memory_gb={c.device_memory_gb} must be positive (GiB per device).",
    )
    require(c.nodes >= 1, "cluster.nodes must be at least 1.")
    port = c.master_port
    require(port is None or 1024 <= port <= 65535, "cluster.master_port must be 1024-65535.")
    require(
        c.master_addr is None or is_plain_host(c.master_addr),
        f"cluster.master_addr={c.master_addr!r} is not a plain host name or IP address.",
    )
    require(
        c.socket_ifname is None or IFNAME.match(c.socket_ifname) is not None,
        f"cluster.socket_ifname={c.socket_ifname!r} is not a network interface name.",
    )
    require(
        c.timeout_minutes > 0,
        f"cluster.timeout_minutes={c.timeout_minutes} must be positive (minutes a collective "
        "may wait on a peer before the run fails).",
    )
    require("\n" not in c.ssh_args, "cluster.ssh_args must be one line.")
    for key, value in c.env.items():
        require(
            ENV_KEY.match(key) is not None and "\n" not in str(value),
            f"cluster.env.{key} must be a NAME=one-line-value pair.",
        )
        require(
            str(value) == str(value).strip(),
            f"cluster.env.{key} must not start or end with whitespace; DeepSpeed's runner "
            "strips it, so remove it.",
        )
    require(
        minutes(c.slurm_time) is not None,
        f"cluster.slurm_time={c.slurm_time!r} is not a Slurm time such as 90, 01:30:00 or "
        "2-00:00:00.",
    )
    backend_for(cfg).validate(cfg, planning=planning)


TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "databricks")
SQL_SCHEMES = ("postgresql", "mysql", "mssql")


def validate_tracking(cfg: MoelabConfig) -> None:
    uri = cfg.tracking.uri
    if uri is None:
        return
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme in ("http", "https"):
        ok = bool(parsed.hostname) and _port_ok(parsed)
    elif scheme == "sqlite":
        ok = uri.startswith("sqlite:///") and len(uri) > len("sqlite:///")
    elif scheme in SQL_SCHEMES:
        ok = bool(parsed.netloc)
    else:
        ok = scheme in ("file", "databricks") or uri == "databricks"
    require(
        ok,
        f"tracking.uri={uri!r} is not a valid tracking URI; use http(s)://host:port, "
        "sqlite:///path/to/mlflow.db or postgresql://user@host/db.",
    )
    require(bool(cfg.tracking.experiment), "tracking.experiment is empty; name an experiment.")


def _port_ok(parsed: ParseResult) -> bool:
    try:
        _ = parsed.port
    except ValueError:
        return False
    return True


def validate_runs_root(cfg: MoelabConfig) -> None:
    """launch.runs_root and its experiment folder (where Hydra puts the run dir) must be
    creatable and writable (checked before launching only)."""
    root = Path(cfg.launch.runs_root).expanduser().absolute()
    existing = root / cfg.tracking.experiment
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    why = "is not a directory" if not existing.is_dir() else _write_probe(existing)
    require(
        not why,
        f"launch.runs_root={cfg.launch.runs_root} is not writable ({existing} {why}); "
        "choose a writable directory.",
    )


def _write_probe(folder: Path) -> str:
    """'' if a file can be created in `folder` (root ignores permission bits), else why not."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return ""
    except OSError as err:
        return f"refuses new files: {err.strerror or err}"
