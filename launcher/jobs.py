"""The outcome of each job of a sweep run in this process: recorded by the job, read by the
sweep callbacks (`launcher.sweep`, `launcher.summary`) and by `launcher.__main__.main`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class JobOutcome:
    """What one sweep job did: recorded by the job, read by the callback and by main()."""

    num: int
    overrides: list[str]
    status: str = "FAILED"
    """FINISHED or FAILED (the status of its MLflow run)."""
    run_id: str | None = None
    message: str = ""
    uri: str | None = None

    @property
    def failed(self) -> bool:
        return self.status != "FINISHED"


_outcomes: list[JobOutcome] = []


def reset() -> None:
    """Forget the outcomes of a previous sweep in this process."""
    _outcomes.clear()


def record(outcome: JobOutcome) -> None:
    _outcomes.append(outcome)


def outcomes() -> list[JobOutcome]:
    return list(_outcomes)


def failed() -> list[JobOutcome]:
    return [o for o in _outcomes if o.failed]
