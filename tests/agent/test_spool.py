"""The report buffer: bounded by count and by age, kept across a restart, compact on disk."""

from __future__ import annotations

from pathlib import Path

import orjson

from taskd.agent.spool import COMPACT_AFTER, ReportBuffer

NOW_MS = 1_800_000_000_000


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.ms = NOW_MS

    def __call__(self) -> float:
        return self.ms / 1000


def _report(time_ms: int) -> bytes:
    return orjson.dumps({"uuid": "u", "time": time_ms, "cpu_usage": 1})


def _times(buffer: ReportBuffer) -> list[int]:
    return [report.time_ms for report in buffer.oldest(1_000_000)]


def test_buffer_keeps_only_the_newest_max_count(tmp_path: Path) -> None:
    """Past max_count the oldest reports are dropped, in memory and in the journal."""
    clock = Clock()
    path = tmp_path / "reports.journal"
    buffer = ReportBuffer(path, max_count=5, max_age_ms=3_600_000, clock=clock)
    for i in range(12):
        buffer.put(NOW_MS + i, _report(NOW_MS + i))
    assert len(buffer) == 5
    assert _times(buffer) == [NOW_MS + i for i in range(7, 12)]
    buffer.close()
    again = ReportBuffer(path, max_count=5, max_age_ms=3_600_000, clock=clock)
    assert _times(again) == [NOW_MS + i for i in range(7, 12)]
    again.close()


def test_buffer_drops_reports_older_than_max_age(tmp_path: Path) -> None:
    """Reports older than max_age_ms leave the buffer as the clock moves on, with no waiting."""
    clock = Clock()
    buffer = ReportBuffer(tmp_path / "j", max_count=1000, max_age_ms=60_000, clock=clock)
    for second in range(100):  # one report a second for 100 s
        clock.ms = NOW_MS + second * 1000
        buffer.put(clock.ms, _report(clock.ms))
    assert len(buffer) == 61  # the last minute, both ends included
    assert _times(buffer)[0] == NOW_MS + 39_000
    clock.ms += 30_000
    assert _times(buffer)[0] == NOW_MS + 69_000
    clock.ms += 3_600_000
    assert buffer.oldest(10) == [] and len(buffer) == 0
    assert not (tmp_path / "j").exists()  # nothing left: the journal is gone
    buffer.close()


def test_sent_reports_stay_sent_across_a_restart(tmp_path: Path) -> None:
    """Reports marked done are not read back by the next buffer; the rest are, in order."""
    clock = Clock()
    path = tmp_path / "reports.journal"
    buffer = ReportBuffer(path, max_count=100, max_age_ms=3_600_000, clock=clock)
    for i in range(10):
        buffer.put(NOW_MS + i, _report(NOW_MS + i))
    batch = buffer.oldest(4)
    buffer.done(batch[-1].seq)
    buffer.put(NOW_MS + 10, _report(NOW_MS + 10))
    buffer.close()
    again = ReportBuffer(path, max_count=100, max_age_ms=3_600_000, clock=clock)
    assert _times(again) == [NOW_MS + i for i in range(4, 11)]
    assert [orjson.loads(r.data)["time"] for r in again.oldest(2)] == [NOW_MS + 4, NOW_MS + 5]
    again.done(again.oldest(100)[-1].seq)
    assert len(again) == 0 and not path.exists()
    again.close()


def test_journal_is_compacted_as_reports_go(tmp_path: Path) -> None:
    """A long outage at the count bound keeps the journal file near the size of what it holds."""
    clock = Clock()
    path = tmp_path / "reports.journal"
    buffer = ReportBuffer(path, max_count=10, max_age_ms=3_600_000, clock=clock)
    line = len(_report(NOW_MS)) + 2
    for i in range(COMPACT_AFTER * 4):
        buffer.put(NOW_MS + i, _report(NOW_MS + i))
        assert path.stat().st_size <= (COMPACT_AFTER + 20) * line
    assert len(buffer) == 10
    buffer.close()


def test_torn_and_foreign_lines_are_skipped(tmp_path: Path) -> None:
    """A line cut short by a crash, or one that is not a report, is skipped on reading back."""
    path = tmp_path / "reports.journal"
    path.write_bytes(
        b"+"
        + _report(NOW_MS)
        + b"\n"
        + b"+{not json\n"
        + b"+[1]\n"
        + b"-"
        + _report(NOW_MS + 1)
        + b"\n+"
        + _report(NOW_MS + 2)[:10]
    )
    buffer = ReportBuffer(path, max_count=100, max_age_ms=3_600_000, clock=Clock())
    assert _times(buffer) == [NOW_MS]
    buffer.close()


def test_unwritable_journal_leaves_the_buffer_in_memory(tmp_path: Path) -> None:
    """Without a writable place on disk the buffer still holds and bounds its reports."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    buffer = ReportBuffer(blocker / "reports.journal", 3, 3_600_000, clock=Clock())
    for i in range(5):
        buffer.put(NOW_MS + i, _report(NOW_MS + i))
    assert _times(buffer) == [NOW_MS + 2, NOW_MS + 3, NOW_MS + 4]
    buffer.done(buffer.oldest(1)[0].seq)
    assert len(buffer) == 2
    buffer.close()
