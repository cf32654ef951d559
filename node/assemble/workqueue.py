"""The hand-off from the receiver to the pipeline: persisted work items for completed studies.

The whole interface is: `claim()` the next completed study, then `done()` or `fail()` it.
A claimed item whose consumer died goes back to the queue when the service restarts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from node.store.index import Index


@dataclass(frozen=True)
class SeriesFiles:
    series_uid: str
    modality: str | None
    description: str | None
    files: tuple[Path, ...]


@dataclass(frozen=True)
class CompletedStudy:
    """A study whose quiet period has passed, with every instance stored for it."""

    work_item_id: int
    study_uid: str
    series: tuple[SeriesFiles, ...]


class WorkQueue:
    def __init__(self, index: Index, data_dir: Path):
        self.index = index
        self.data_dir = Path(data_dir)

    def requeue_claimed(self) -> int:
        """At start-up: items a consumer was running when it died go back to the queue."""
        with self.index.transaction() as db:
            cur = db.execute(
                "UPDATE work_items SET state='queued', updated_at=? WHERE state='running'",
                (time.time(),),
            )
            return cur.rowcount

    def claim(self) -> CompletedStudy | None:
        """The next queued study (highest priority first, then oldest), now 'running'."""
        with self.index.transaction() as db:
            row = db.execute(
                "SELECT id, study_uid FROM work_items WHERE state='queued' ORDER BY priority DESC, id LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE work_items SET state='running', updated_at=? WHERE id=?",
                (time.time(), row["id"]),
            )
        return CompletedStudy(row["id"], row["study_uid"], self.series_of(row["study_uid"]))

    def done(self, item_id: int) -> None:
        self._finish(item_id, "done", None)

    def fail(self, item_id: int, reason: str) -> None:
        self._finish(item_id, "failed", reason)

    def ignore(self, item_id: int, reason: str) -> None:
        self._finish(item_id, "ignored", reason)

    def retry(self, item_id: int) -> bool:
        """Queue a failed (or ignored) item again."""
        with self.index.transaction() as db:
            cur = db.execute(
                "UPDATE work_items SET state='queued', reason=NULL, updated_at=? WHERE id=? AND state IN ('failed', 'ignored')",
                (time.time(), item_id),
            )
            return cur.rowcount == 1

    def _finish(self, item_id: int, state: str, reason: str | None) -> None:
        with self.index.transaction() as db:
            db.execute(
                "UPDATE work_items SET state=?, reason=?, updated_at=? WHERE id=?",
                (state, reason, time.time(), item_id),
            )

    def series_of(self, study_uid: str) -> tuple[SeriesFiles, ...]:
        rows = self.index.query(
            """SELECT s.series_uid, s.modality, s.description, i.path
               FROM series s JOIN instances i ON i.series_uid = s.series_uid
               WHERE s.study_uid=? ORDER BY s.series_uid, i.path""",
            (study_uid,),
        )
        grouped: dict[str, list] = {}
        meta: dict[str, tuple[str | None, str | None]] = {}
        for row in rows:
            grouped.setdefault(row["series_uid"], []).append(self.data_dir / row["path"])
            meta[row["series_uid"]] = (row["modality"], row["description"])
        return tuple(
            SeriesFiles(uid, meta[uid][0], meta[uid][1], tuple(files))
            for uid, files in grouped.items()
        )
