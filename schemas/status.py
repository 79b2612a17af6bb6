from enum import StrEnum


class JobStatus(StrEnum):
    """Where a job is. Exactly one terminal state is ever reached per job."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    def is_terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def rank(self) -> int:
        """Order of progress; a projection never moves a job to a lower rank."""
        return _RANK[self]


_TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED})
_RANK = {
    JobStatus.PENDING: 0,
    JobStatus.PROCESSING: 1,
    JobStatus.COMPLETED: 2,
    JobStatus.FAILED: 2,
    JobStatus.CANCELED: 2,
}
