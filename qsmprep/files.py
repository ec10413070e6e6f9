"""Writing files so that a reader never sees half of one (a temporary name, then a rename), a long
stage's progress for the terminal, and ITK transform files."""
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
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


# In a stage's working folder: how far its long computation is, for the terminal's progress bar
# (stages run in worker processes, which cannot draw on the terminal).
STAGE_PROGRESS_FILE = 'progress.txt'


def stage_progress_writer(folder, interval_s=1.0):
    """A ``progress(done, total)`` callback that writes ``done total`` to ``STAGE_PROGRESS_FILE`` in
    ``folder`` at most every ``interval_s`` and at the end; what an earlier run left there goes."""
    path = Path(folder) / STAGE_PROGRESS_FILE
    path.unlink(missing_ok=True)
    last_written = [-float('inf')]

    def progress(done, total):
        now = time.monotonic()
        if now - last_written[0] >= interval_s or done >= total:
            last_written[0] = now
            write_text_atomically(path, f'{done} {total}\n')
    return progress


def read_stage_progress(folder):
    """``(done, total)`` as ``stage_progress_writer`` last wrote it in ``folder``; None if nothing."""
    try:
        done, total = (int(value) for value in (Path(folder) / STAGE_PROGRESS_FILE).read_text().split())
    except (OSError, ValueError):
        return None
    return done, total


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


# NIfTI's world is RAS+, ITK's LPS: the two differ by a half turn about z.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def write_itk_transform(matrix_ras, path):
    """Write the 4x4 affine ``matrix_ras`` (RAS+ mm, reference point to moving point) as an ITK
    text transform, which works in LPS, as fMRIPrep's ``_xfm.txt`` files."""
    import SimpleITK as sitk

    matrix_ras = np.asarray(matrix_ras, dtype=float)
    itk = sitk.AffineTransform(3)
    itk.SetMatrix((RAS_TO_LPS @ matrix_ras[:3, :3] @ RAS_TO_LPS).flatten().tolist())
    itk.SetTranslation((RAS_TO_LPS @ matrix_ras[:3, 3]).tolist())
    temporary = temporary_path(path)
    try:
        sitk.WriteTransform(itk, str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_itk_transform(path):
    """The 4x4 RAS+ matrix of an ITK text transform written by ``write_itk_transform``."""
    import SimpleITK as sitk

    itk = sitk.AffineTransform(sitk.ReadTransform(str(path)))
    matrix = np.eye(4)
    rotation = np.asarray(itk.GetMatrix()).reshape(3, 3)
    center, translation = np.asarray(itk.GetCenter()), np.asarray(itk.GetTranslation())
    matrix[:3, :3] = RAS_TO_LPS @ rotation @ RAS_TO_LPS
    matrix[:3, 3] = RAS_TO_LPS @ (center + translation - rotation @ center)
    return matrix
