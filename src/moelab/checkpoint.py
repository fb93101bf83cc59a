"""Checkpoints, resume and graceful stop (preemption) of a training run.

Layout under `<run dir>/checkpoints/` (DeepSpeed's `save_checkpoint` writes the tag dirs):

    global_step<N>/   model, expert, optimizer and scheduler shards + our client_state
    latest            the newest *complete* tag (written by us after all ranks finished)
    meta.json         step, tag, world_size, ep_size, moe_impl: read by the launcher
                      without torch

The module imports torch lazily so the launcher can use `read_meta`/`check_layout`.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from moelab.config import MoelabConfig
from moelab.rundir import RunDir

if TYPE_CHECKING:
    import torch


def read_meta(run_dir: str | Path) -> dict[str, Any] | None:
    """meta.json of the run dir's newest complete checkpoint, None if there is none."""
    path = RunDir(run_dir).checkpoint_meta
    return json.loads(path.read_text()) if path.exists() else None


def ep_may_change(cfg: MoelabConfig) -> bool:
    """Whether this run's checkpoints load at another ep_size: AutoEP below ZeRO-3 writes one
    file per expert (loaded by global id). Its ZeRO optimizer state loads at the other
    ep_size without an error but gives other updates than an uninterrupted run, so a resume
    at another ep_size restarts the optimizer (`Checkpointer.load`)."""
    return cfg.model.is_moe and cfg.model.moe.impl == "autoep" and cfg.zero.stage < 3


def check_layout(
    meta: dict[str, Any], world_size: int, ep_size: int, ep_changes: bool = False
) -> None:
    """Raise ValueError if a checkpoint cannot be loaded with this world size and ep_size
    (`ep_changes`: the run's checkpoints load at another ep_size, see `ep_may_change`)."""
    if meta["world_size"] != world_size or (meta["ep_size"] != ep_size and not ep_changes):
        only_ep = meta["world_size"] == world_size
        hint = " (ep_size may change with model.moe.impl=autoep below ZeRO-3 only)"
        raise ValueError(
            f"the checkpoint at step {meta['step']} was written with world size "
            f"{meta['world_size']} and ep_size {meta['ep_size']}, not {world_size} and "
            f"{ep_size}{hint if only_ep else ''}; resume with the same layout or start a new run."
        )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class BatchStream:
    """Batches forever, epoch after epoch, with a position that can be saved and restored."""

    def __init__(self, loader: Any, epoch: int = 0, consumed: int = 0) -> None:
        self.loader, self.epoch, self.consumed = loader, epoch, consumed
        if len(loader) == 0:
            raise ValueError("the data loader has no full batch; lower train.micro_batch_size.")
        self._it: Iterator[Any] | None = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None or self.consumed >= len(self.loader):
            if self._it is not None:
                self.epoch, self.consumed = self.epoch + 1, 0
            self.loader.sampler.set_epoch(self.epoch)
            self._it = iter(self.loader)
            for _ in range(self.consumed):  # fast-forward inside the epoch (same order)
                next(self._it)
        self.consumed += 1
        return dict(next(self._it))

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}


def rng_state() -> dict[str, Any]:
    """torch (CPU), numpy and python RNG states, and the accelerator's under "device"."""
    import numpy as np
    import torch

    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "py": random.getstate(),
    }
    return state | {"device": _device_rng_state()}


def _device_rng_state() -> dict[str, Any]:
    """The accelerator's name and one RNG state per device (CUDA: every visible GPU)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    name = acc.device_name()
    if name == "cpu":  # DeepSpeed's CPU accelerator draws from torch's CPU generator
        return {"accelerator": name, "states": [acc.get_rng_state()]}
    return {
        "accelerator": name,
        "states": [acc.get_rng_state(i) for i in range(acc.device_count())],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`; the accelerator's only on the same kind of accelerator."""
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["py"])
    _set_device_rng_state(state.get("device"))


def _set_device_rng_state(saved: dict[str, Any] | None) -> None:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    name = acc.device_name()
    have = saved["accelerator"] if saved else None
    if have is not None and have != name:
        print(f"moelab: the checkpoint's {have} RNG states are not restored on {name}", flush=True)
    if have != name:
        if name != "cpu":  # on the CPU accelerator, "torch" above was its generator
            print(
                f"moelab: {name} RNG not restored: its draws differ from an uninterrupted run",
                flush=True,
            )
        return
    states = saved["states"] if saved else []
    count = 1 if name == "cpu" else acc.device_count()
    if len(states) != count:
        print(f"moelab: {len(states)} saved {name} RNG states for {count} devices", flush=True)
    for i, device_state in enumerate(states[:count]):
        acc.set_rng_state(device_state, None if name == "cpu" else i)


def seed_all(seed: int) -> None:
    """Seed python, numpy, torch's CPU generator and every accelerator device."""
    import numpy as np
    import torch
    from deepspeed.accelerator import get_accelerator

    torch.manual_seed(seed)  # seeds every CUDA device too
    get_accelerator().manual_seed_all(seed)  # any other accelerator (CUDA: the same again)
    np.random.seed(seed)
    random.seed(seed)


class StopFlag:
    """A stop request: the launcher's stop file in the run dir, or a signal to this rank.

    The launcher does not signal the ranks itself: a file works across hosts on the shared
    run dir and does not interrupt a rank inside a collective. A signal sent straight to a
    rank (a scheduler preempting every task) sets the flag too; a second one kills at once.
    """

    def __init__(self, run_dir: str | Path, file_every_s: float = 1.0) -> None:
        self.raised = False
        self.file = RunDir(run_dir).stop_request
        self.file_every_s, self.checked_at = file_every_s, -math.inf
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.raised:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.raised = True
        print(f"moelab: signal {signum}: stopping after this step (again to exit now)", flush=True)

    def local(self, device: Any) -> torch.Tensor:
        """(1,) on `device`: 1.0 if this rank saw a stop request (the loop ORs it over ranks).

        The shared stop file is looked at once every `file_every_s` seconds, not every step:
        a stat on a network filesystem costs more than a GPU step of a small model."""
        import torch

        now = time.monotonic()
        if not self.raised and now - self.checked_at >= self.file_every_s:
            self.checked_at = now
            self.raised = self.file.exists()
        return torch.full((1,), float(self.raised), device=device)  # a fill: no host copy


CLIENT_KEYS = ("step", "tokens", "rng", "data")
"""What moelab saves in a checkpoint's client state."""


class Checkpointer:
    """Saves and restores one run's checkpoints (every rank holds one; all call each method)."""

    def __init__(self, cfg: MoelabConfig, world_size: int, ep_size: int, rank: int) -> None:
        self.cfg, self.dir = cfg, RunDir(cfg.run_dir).checkpoints
        self.world_size, self.ep_size, self.rank = world_size, ep_size, rank
        self.resumed = False

    def due(self, step: int, stopping: bool) -> bool:
        """A stop, every checkpoint_every steps, and the last step of a run that checkpoints
        or was resumed (meta.json then says the run is finished, not stopped)."""
        every, last = self.cfg.train.checkpoint_every, step == self.cfg.train.steps
        return (
            stopping or bool(every and step % every == 0) or (last and bool(every or self.resumed))
        )

    def save(self, ds_engine: Any, step: int, stream: BatchStream) -> None:
        import torch.distributed as dist

        rngs: list[Any] = [None] * self.world_size
        dist.all_gather_object(rngs, rng_state())
        tag = f"global_step{step}"
        state = {"step": step, "tokens": step * self._tokens_per_step(), "rng": rngs}
        state |= {"data": stream.position()}
        assert set(state) == set(CLIENT_KEYS)
        # save_latest=False: DeepSpeed's rank 0 would write `latest` before the other ranks'
        # shards are done; save_checkpoint ends with a barrier, after which all are on disk.
        ds_engine.save_checkpoint(str(self.dir), tag=tag, client_state=state, save_latest=False)
        if self.rank == 0:
            self._commit(tag, step)
        dist.barrier()

    def _tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * t.grad_accum * self.world_size * self.cfg.data.seq_len

    def _commit(self, tag: str, step: int) -> None:
        _write_atomic(self.dir / "latest", tag)
        meta = {"step": step, "tag": tag, "world_size": self.world_size, "ep_size": self.ep_size}
        meta["moe_impl"] = self.cfg.model.moe.impl if self.cfg.model.is_moe else None
        _write_atomic(RunDir(self.cfg.run_dir).checkpoint_meta, json.dumps(meta) + "\n")
        tags = sorted(
            (p for p in self.dir.glob("global_step*") if p.is_dir()),
            key=lambda p: int(p.name.removeprefix("global_step")),
        )
        for old in tags[: -max(self.cfg.train.keep_checkpoints, 1)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, ds_engine: Any) -> dict[str, Any] | None:
        """Restore engine, RNG; the client_state (step, tokens, data), the checkpoint's "tag"
        and, when the optimizer restarted, "optimizer" (e.g. `restarted (ep_size 2 -> 1)`);
        None if there is no checkpoint to load."""
        meta = read_meta(self.cfg.run_dir)
        if self.cfg.train.resume == "never" or meta is None:
            # The training RNG stream starts at train.seed whatever set-up consumed (e.g. a
            # first-time FLOP/s probe), so a run and its restarts draw the same numbers.
            seed_all(self.cfg.train.seed)
            return None
        check_layout(meta, self.world_size, self.ep_size, ep_may_change(self.cfg))
        restart = meta["ep_size"] != self.ep_size  # see ep_may_change
        path, state = ds_engine.load_checkpoint(
            str(self.dir), tag=meta["tag"], load_optimizer_states=not restart
        )
        if path is None:
            raise RuntimeError(f"could not load checkpoint {meta['tag']} from {self.dir}.")
        set_rng_state(state["rng"][self.rank])
        self.resumed = True
        # Without ZeRO, DeepSpeed's client state also holds its own entries ("optimizer": the
        # whole optimizer state): keep moelab's.
        out = {k: state[k] for k in CLIENT_KEYS if k in state} | {"tag": meta["tag"]}
        if restart:
            out["optimizer"] = f"restarted (ep_size {meta['ep_size']} -> {self.ep_size})"
        return out
