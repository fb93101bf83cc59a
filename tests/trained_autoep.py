"""Shared AutoEP runs (`model.moe.impl=autoep`, 2 ranks, ep_size 2), made once per session
whichever test asks first: an uninterrupted ZeRO-2 reference (checkpoints at steps 4 and 8,
eval at 8), exported as a Hugging Face folder (`trained_autoep`: export and routing read it,
fine-tuning starts from it); a ZeRO-3 run stopped at step 4 and resumed; a ZeRO-2 run stopped
at step 4 and resumed at ep_size 1 (`autoep_runs`: test_autoep_resume)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import run_launcher
from trained_moe import TrainedMoE, _remove_shm_buffers, loss_history, the_run

STEPS, STOP = 8, 4
RUN = (
    "model=tiny_moe_top2",
    "model.moe.impl=autoep",
    "parallel=ep2",
    "train=smoke",
    f"train.steps={STEPS}",
    "train.log_every=1",
    "train.eval_every=0",
    f"train.checkpoint_every={STOP}",
)


@dataclass(frozen=True)
class Launched:
    """One run dir after its launches: the launcher's output of each, in order."""

    workdir: Path
    run_dir: Path
    outs: list[str]

    def losses(self) -> dict[int, float]:
        history = loss_history(self.workdir)
        steps = [s for s, _ in history]
        assert len(steps) == len(set(steps)), f"a step logged twice: {history}"
        return dict(history)

    def tags(self) -> dict[str, str]:
        client, run_id = the_run(self.workdir)
        return dict(client.get_run(run_id).data.tags)

    def tail(self) -> str:
        return "\n---\n".join(out[-2500:] for out in self.outs)


@dataclass(frozen=True)
class AutoEPRuns:
    reference: Launched  # ZeRO-2, ep_size 2, uninterrupted
    zero3: Launched  # ZeRO-3, stop_after=4, resumed
    new_ep: Launched  # ZeRO-2, stop_after=4 at ep_size 2, resumed at ep_size 1


def launch(workdir: Path, cache: Path, *args: str, resume: list[str] | None = None) -> Launched:
    """A run (and, with `resume`, `moelab-launch resume RUN_DIR *resume` after it)."""
    first = run_launcher(workdir, cache, *RUN, *args)
    outs = [first.stdout + first.stderr]
    assert first.returncode == 0, outs[0][-4000:]
    (run_dir,) = (workdir / "runs" / "moelab").iterdir()
    if resume is not None:
        again = run_launcher(workdir, cache, "resume", str(run_dir), *resume)
        outs.append(again.stdout + again.stderr)
        assert again.returncode == 0, outs[-1][-4000:]
    _remove_shm_buffers(run_dir)
    return Launched(workdir, run_dir, outs)


_RUNS: dict[str, AutoEPRuns] = {}


@pytest.fixture(scope="session")
def autoep_runs(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> AutoEPRuns:
    if "runs" not in _RUNS:
        mk, stop = tmp_path_factory.mktemp, f"train.stop_after={STOP}"
        _RUNS["runs"] = AutoEPRuns(
            reference=launch(mk("autoep-ref"), shared_cache, "zero=stage2"),
            zero3=launch(mk("autoep-z3"), shared_cache, "zero=stage3", stop, resume=[]),
            new_ep=launch(
                mk("autoep-ep1"), shared_cache, "zero=stage2", stop, resume=["parallel.ep_size=1"]
            ),
        )
    return _RUNS["runs"]


_EXPORTED: dict[str, TrainedMoE] = {}


@pytest.fixture(scope="session")
def trained_autoep(autoep_runs: AutoEPRuns, shared_cache: Path) -> TrainedMoE:
    """The AutoEP reference run and its export (its last checkpoint, step 8, evaluated)."""
    if "run" not in _EXPORTED:
        from moelab.export import export

        ref = autoep_runs.reference
        hf_dir = export(ref.run_dir, ref.workdir / "hf")
        _EXPORTED["run"] = TrainedMoE(ref.workdir, ref.run_dir, shared_cache, hf_dir)
    return _EXPORTED["run"]
