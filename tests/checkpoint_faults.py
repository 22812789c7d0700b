"""Making a save fail, or a rank die, at a chosen point: patches of the checkpoint modules' own functions,
inside the process that must fail (production code has no test seams).

- `after_write`: this rank's data files are written and fsynced, DCP's `.metadata` not yet (an error
  there reaches DCP, which reports it to every rank);
- `before_commit`: everything is written (index, meta.json, checksums), before the rename.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from unittest import mock

from megatron_lite.checkpoint import dcp_io, store


@contextmanager
def after_write(action: Callable[[], None]) -> Iterator[None]:
    """Call `action` (raise, or os._exit) once this rank's data files are on disk, before `.metadata`."""
    real = dcp_io.sync_and_checksum

    def sync_then_fail(directory: str, names: list[str], checksums: bool) -> dict[str, dict]:
        sums = real(directory, names, checksums)
        if ".metadata" not in names:  # the data files (finish() syncs `.metadata` alone, later)
            action()
        return sums

    with mock.patch.object(dcp_io, "sync_and_checksum", sync_then_fail):
        yield


@contextmanager
def before_commit(action: Callable[[], None]) -> Iterator[None]:
    """Call `action` instead of the commit (rank 0's rename); it must raise, or the save goes on as if
    committed."""

    def fail(*args, **kwargs):
        action()
        raise AssertionError("before_commit: the action was expected to raise")

    with mock.patch.object(store, "commit", fail):
        yield
