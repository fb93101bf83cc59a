"""moelab-sync: replay a run's MLflow spool (records logged while the server was down).

    moelab-sync runs/<run dir> [--tracking-uri URI]

Each record goes to the server once: progress is kept in `mlflow_spool.offset`, so running
it again, or after a crash mid-replay, sends only what is left. Exit 0 when nothing is left,
1 when the server is still unreachable, 2 when the directory holds no spool.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moelab.rundir import RunDir
from moelab.telemetry.spool import Replayer, ServerDown, Spool, bound_http_retries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moelab-sync", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run directory holding the spool")
    parser.add_argument(
        "--tracking-uri", default=None, help="override the tracking URI recorded in the spool"
    )
    args = parser.parse_args(argv)
    spool_file = RunDir(args.run_dir).spool
    if not spool_file.exists():
        print(
            f"moelab-sync: {args.run_dir} holds no {spool_file.name}; nothing to replay.",
            file=sys.stderr,
        )
        return 2
    bound_http_retries()
    spool = Spool(args.run_dir)
    replayer = Replayer(spool, args.tracking_uri)
    try:
        sent = replayer.drain()
    except ServerDown as err:
        left = spool.pending_records()
        print(
            f"moelab-sync: the tracking server is unreachable ({err}); "
            f"{left} records are still spooled, run moelab-sync again later.",
            file=sys.stderr,
        )
        return 1
    print(f"moelab-sync: replayed {sent} records from {spool.path}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
