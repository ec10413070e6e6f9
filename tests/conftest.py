"""Shared simulated heads (benchmarks/simulate_bids.py), built once per test session.

The 2 mm head is the smallest on which every stage still behaves as at 1 mm; the 3 mm BIDS
dataset keeps the end-to-end runs of the real command line fast.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.simulate_bids import (ECHO_TIMES_S, FIELD_STRENGTH_T, head_phantom,  # noqa: E402
                                      simulate_dataset, simulate_megre, tilted_affine)
from qsmprep.science.physics import voxel_size_from_affine  # noqa: E402


class SimulatedHead:
    """A phantom, its affine and its simulated multi-echo signal with the true fields."""

    def __init__(self, voxel_size_mm, tilt_deg, peak_snr=100.0):
        self.phantom, affine = head_phantom(voxel_size_mm)
        self.affine = tilted_affine(affine, tilt_deg)
        self.megre = simulate_megre(self.phantom, self.affine, peak_snr=peak_snr)
        # As the pipeline reads it from the float32 affine of a NIfTI file: tilted, it is off by rounding.
        self.voxel_size = voxel_size_from_affine(self.affine.astype(np.float32))
        self.echo_times = np.asarray(ECHO_TIMES_S)
        self.field_strength = FIELD_STRENGTH_T
        self.brain = self.phantom['brain_mask']
        self.chi = np.where(self.brain, self.phantom['chi'], 0)


@pytest.fixture
def one_torch_thread():
    """torch on one thread: the test machines' few cores are shared, and one thread is faster than
    contending for two."""
    torch = pytest.importorskip('torch')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def head():
    return SimulatedHead(2.0, 0.0)


@pytest.fixture(scope='session')
def tilted_head():
    return SimulatedHead(2.0, 18.0)


@pytest.fixture(scope='session')
def bids_dataset(tmp_path_factory):
    """A 3 mm BIDS dataset with one upright subject (01) and one tilted by 18 degrees (02)."""
    bids_dir = tmp_path_factory.mktemp('sim') / 'bids'
    simulate_dataset(bids_dir, voxel_size_mm=3.0, tilts_deg=(0.0, 18.0))
    return bids_dir


def run_console_script(script, *args):
    """Run one of qsmprep's console scripts as a user would; returns the completed process."""
    executable = str(Path(sys.executable).with_name(script))
    return subprocess.run([executable, *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope='session')
def run_qsmprep():
    return lambda *args: run_console_script('qsmprep', *args)


@pytest.fixture(scope='session')
def run_tool():
    return lambda *args: run_console_script('qsmprep-tools', *args)
