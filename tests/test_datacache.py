"""moelab.datacache: a run whose data is cached starts its ranks without importing torch; any
change to the sources or the cache falls back to the full preparation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import launcher_env
from moelab import data
from moelab.config import ClusterConfig, DataConfig, MoelabConfig, TrainConfig, load_config
from moelab.datacache import ready, receipt_path

STARTED = "the command started"


def write_corpus(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        line = f"Document {i}: the quick brown fox jumps over the lazy dog {i}.\n"
        (folder / f"doc{i}.txt").write_text(line * 60)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    write_corpus(tmp_path / "corpus")
    cfg = MoelabConfig(
        data=DataConfig(
            source="text",
            data_files=[str(tmp_path / "corpus" / "*.txt")],
            tokenizer_vocab_size=300,
            seq_len=16,
            val_fraction=0.25,
            cache_dir=str(tmp_path / "cache"),
        ),
        train=TrainConfig(micro_batch_size=1),
        cluster=ClusterConfig(nproc_per_node=1),  # world size 1, as the launcher resolves it
    )
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return path


def start(config: Path) -> tuple[str, set[str]]:
    """`python -m moelab.datacache --config C -- python -c print(...)`: its output and the
    top-level packages it imported (from -X importtime)."""
    proc = subprocess.run(
        [
            *(sys.executable, "-X", "importtime", "-m", "moelab.datacache"),
            *("--config", str(config)),
            *("--", sys.executable, "-c", f"print({STARTED!r})"),
        ],
        env=launcher_env(config.parent, config.parent / "cache"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert STARTED in proc.stdout
    imported = {
        line.split("|")[-1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return proc.stdout, imported


def test_a_valid_receipt_starts_the_command_without_torch(config: Path) -> None:
    out, imported = start(config)
    assert "moelab: data ready (tokenized" in out and "torch" in imported
    out, imported = start(config)
    assert "moelab: data ready (from the cache by its receipt, " in out, out
    assert imported.isdisjoint({"torch", "datasets", "transformers"}), sorted(imported)


HOLDS = ("none", "other_batch", "other_world")
"""Changes the receipt survives: the run asks no more than the prepared data holds."""


def ask(config: Path, key: str, value: int) -> None:
    """Set `key` (section.field) in the run's config.yaml."""
    cfg = OmegaConf.load(config)
    OmegaConf.update(cfg, key, value)
    config.write_text(OmegaConf.to_yaml(cfg))


@pytest.mark.parametrize(
    "change",
    ["edit", "add", "delete_cache", "batch_too_big", "vocab_too_small", *HOLDS],
)
def test_any_change_voids_the_receipt(config: Path, change: str) -> None:
    """Changed sources or cache void it; so does a run the data cannot feed (a micro-batch per
    rank in each split, token ids inside the vocabulary), whose full preparation then says
    why. Another micro-batch or world size the data can feed keeps it."""
    data.main(["--config", str(config)])
    assert ready(load_config(config)) is not None
    counts = json.loads(receipt_path(load_config(config)).read_text())["counts"]
    corpus, cache = config.parent / "corpus", config.parent / "cache"
    if change == "edit":
        (corpus / "doc0.txt").write_text("An edited document, longer than before.\n" * 80)
    elif change == "add":
        (corpus / "doc9.txt").write_text("A new document.\n" * 60)
    elif change == "delete_cache":
        shutil.rmtree(cache / "blocks")
    elif change == "batch_too_big":
        ask(config, "train.micro_batch_size", counts["val_blocks"] + 1)
    elif change == "vocab_too_small":
        ask(config, "model.vocab_size", 64)
    elif change == "other_batch":
        ask(config, "train.micro_batch_size", 2)
    elif change == "other_world":
        ask(config, "cluster.nproc_per_node", 2)
    held = ready(load_config(config))
    assert (held is not None) == (change in HOLDS), (held, counts)
    if held is not None:
        assert held.endswith("validation blocks of 16 tokens") and " train and " in held
    elif change in ("batch_too_big", "vocab_too_small"):
        with pytest.raises(SystemExit) as err:
            data.main(["--config", str(config)])
        assert err.value.code == 2


def test_the_receipt_is_keyed_by_the_data_settings(config: Path) -> None:
    cfg = load_config(config)
    first = receipt_path(cfg)
    cfg.data.seq_len = 32
    assert receipt_path(cfg) != first
