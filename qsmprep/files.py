"""Writing files so that a reader never sees half of one: a temporary name, then a rename."""
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import psutil

# Prefix of the temporary files of one process; what an interrupted run leaves can be found by it.
TEMPORARY_PREFIX = '.qsmprep-tmp-'


def temporary_path(path):
    """A hidden name beside ``path`` that keeps its extension (nibabel picks the format by it)."""
    path = Path(path)
    return path.with_name(f'{TEMPORARY_PREFIX}{os.getpid()}-{path.name}')


def write_text_atomically(path, text):
    """Write ``text`` to ``path``: complete or not at all (a full disk leaves the old file)."""
    path = Path(path)
    temporary = temporary_path(path)
    try:
        with open(temporary, 'w', encoding='utf-8') as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def remove_temporary_files(folder):
    """Remove the temporary files under ``folder`` of this process and of processes that are gone
    (a run killed with SIGKILL); those of other running processes stay."""
    for path in Path(folder).rglob(f'{TEMPORARY_PREFIX}*'):
        pid = path.name[len(TEMPORARY_PREFIX):].split('-', 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or not psutil.pid_exists(int(pid)):
            path.unlink(missing_ok=True)


@contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM until the block ends, so that a group of renames completes."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
