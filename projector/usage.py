"""Job rows written together with the per-owner usage counters they feed.

Both writers of job rows go through here, in the transaction that writes them: the projector,
and the ingress's read-your-writes insert of a pending row. The counters move by the difference
between each row before and after the write (``apply.UsageChanges``), so a job counts once
whichever of the two inserts it first, and a redelivered or replayed event counts nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import Connection, bindparam, select

from projector.apply import JobRow, UsageChanges
from projector.database import insert_absent, upsert, write_usage
from projector.tables import jobs

_JOBS_BY_ID = select(jobs).where(jobs.c.id.in_(bindparam("ids", expanding=True)))


def insert_jobs(conn: Connection, rows: Sequence[JobRow]) -> set[str]:
    """Insert the rows whose job has none yet and count them; returns the ids inserted."""
    inserted = insert_absent(conn, jobs, [row.to_columns() for row in rows])
    changes = UsageChanges()
    for row in rows:
        if row.id in inserted:
            changes.count(None, row)
    write_usage(conn, changes)
    return inserted


def write_jobs(conn: Connection, loaded: Mapping[str, JobRow], changed: Sequence[JobRow]) -> None:
    """Write ``changed`` rows (in id order) over ``loaded``, the rows as this transaction read
    them, and move the counters by the difference."""
    before = dict(loaded)
    new = [row for row in changed if row.id not in loaded]
    inserted = insert_absent(conn, jobs, [row.to_columns() for row in new])
    if raced := [row.id for row in new if row.id not in inserted]:
        # PostgreSQL: the ingress committed a pending row since this transaction read (insert-if-
        # absent waited for it). That row, counted by the ingress, is what this write replaces.
        for found in conn.execute(_JOBS_BY_ID, {"ids": raced}).mappings():
            before[found["id"]] = JobRow.from_columns(found)
    upsert(conn, jobs, [row.to_columns() for row in changed if row.id not in inserted])
    changes = UsageChanges()
    for row in changed:
        changes.count(before.get(row.id), row)
    write_usage(conn, changes)
