"""Rigid registration of head orientations: qsmprep's SimpleITK registration against ANTsPy's.

    python benchmarks/registration_comparison.py --out benchmarks/REGISTRATION.md [--seeds 0 1]

Why qsmprep registers with SimpleITK and not ANTs: this scores both on the same simulated heads.
Per seed, ``simulate_bids.simulate_orientations`` makes one 1.5 mm head in the 6 orientations of
``orientations_benchmark.TURNS``, the head turned inside one grid and resampled. Each later run's
first-echo magnitude is registered onto run 1's, with run 1's true brain mask as the reference mask:

- qsmprep, reference mask: ``registration.register_rigid`` (Mattes mutual information over the
  mask dilated by ``MASK_DILATION_MM``, shrink 4-2-1), started from the principal axes of the
  reference mask and of the moving brain's mask that it finds from the moving magnitude: the same
  inputs as ANTsPy gets, and what ``qsmprep-tools register --reference-mask`` does;
- qsmprep, both masks: the same with the run's own true brain mask as ``moving_mask``, as the
  ``--multi-orientation`` workflow calls it with each run's brain mask;
- ANTsPy: ``ants.registration(type_of_transform='Rigid')``, its preset (Mattes mutual information,
  32 bins, 20 % of the voxels, shrink 6-4-2-1, started from the centres of mass), with qsmprep's
  dilated reference mask as its ``mask``.

All run with 2 threads and a fixed random seed. Each result is turned into a 4x4 RAS world
transform from run 1 to the run and scored as ``orientations_benchmark.registration_errors`` does:
the largest displacement error over the true brain (mm) and the rotation error (degrees, by a
formula exact near 0, as ANTs' matrix is in single precision); seconds
are the wall time of the registration call alone (images already in memory).

ANTsPy is a benchmark-only dependency, not one of qsmprep's: ``pip install antspyx``. Its 0.6.3 wheel
asks for numpy < 2.4 and scipy < 1.16 and pip downgrades them; it ran here with numpy 2.4.6 and
scipy 1.17.1 reinstalled over it (``pip install numpy==2.4.6 scipy==1.17.1``).
"""
import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

THREADS = 2
# ITK reads its default thread count once, on first use: set before SimpleITK or ANTs loads.
os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS'] = str(THREADS)

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.orientations_benchmark import ANISOTROPY_PPM, TURNS  # noqa: E402
from benchmarks.simulate_bids import simulate_orientations  # noqa: E402
from qsmprep.science import masking, registration  # noqa: E402
from qsmprep.science.physics import voxel_size_from_affine  # noqa: E402

VOXEL_SIZE_MM = 1.5
ANTS_SEED = 20261206  # ANTs samples the metric's voxels at random too: fixed, as qsmprep's RANDOM_SEED
# ITK's world is LPS, nibabel's RAS: x and y change sign.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
LIBRARIES = ('qsmprep, reference mask', 'qsmprep, both masks', 'ANTsPy, reference mask')
MISSING_ANTS = ('ANTsPy is missing: it is a benchmark-only dependency, not one of qsmprep\'s. Install it with\n'
                '    pip install antspyx\n'
                'into the environment that runs this script.')


def _load(path):
    image = nib.load(str(path))
    return np.asanyarray(image.dataobj).astype(np.float32), image.affine


def ants_image(array, affine):
    """An ANTs image of ``array`` (nibabel order, which ANTs shares) placed by the RAS ``affine``."""
    import ants

    lps = RAS_TO_LPS @ np.asarray(affine, dtype=float)[:3]
    voxel_size = np.linalg.norm(lps[:, :3], axis=0)
    return ants.from_numpy(np.asarray(array, dtype=np.float32), origin=lps[:, 3].tolist(),
                           spacing=voxel_size.tolist(), direction=lps[:, :3] / voxel_size)


def register_ants(moving, moving_affine, moving_mask, reference, reference_affine, reference_mask):
    """ANTs' rigid preset over the mask qsmprep's metric sees (``moving_mask`` unused, as qsmprep's
    first column); the 4x4 RAS world transform from the reference to the moving image, as
    qsmprep's ``RigidTransform.matrix``."""
    import ants

    around = masking.dilated(reference_mask, registration.MASK_DILATION_MM, voxel_size_from_affine(reference_affine))
    with tempfile.TemporaryDirectory() as folder:
        result = ants.registration(ants_image(reference, reference_affine), ants_image(moving, moving_affine),
                                   type_of_transform='Rigid', mask=ants_image(around, reference_affine),
                                   outprefix=folder + '/')
        # The forward transform maps fixed (reference) points to moving points, in LPS.
        transform = ants.read_transform(result['fwdtransforms'][0])
    parameters, centre = np.asarray(transform.parameters), np.asarray(transform.fixed_parameters)
    rotation, shift = parameters[:9].reshape(3, 3), parameters[9:12]
    matrix = np.eye(4)
    matrix[:3, :3] = RAS_TO_LPS @ rotation @ RAS_TO_LPS
    matrix[:3, 3] = RAS_TO_LPS @ (centre + shift - rotation @ centre)
    return matrix


def register_qsmprep(moving, moving_affine, moving_mask, reference, reference_affine, reference_mask):
    return registration.register_rigid(moving, moving_affine, reference, reference_affine,
                                       reference_mask=reference_mask, num_threads=THREADS).matrix


def register_qsmprep_both_masks(moving, moving_affine, moving_mask, reference, reference_affine, reference_mask):
    return registration.register_rigid(moving, moving_affine, reference, reference_affine,
                                       reference_mask=reference_mask, moving_mask=moving_mask,
                                       num_threads=THREADS).matrix


def transform_errors(found, expected, points):
    """Largest displacement error (mm) over ``points`` and rotation error (degrees), as
    ``orientations_benchmark.registration_errors`` scores them."""
    residual = found[:3, :3] @ expected[:3, :3].T
    # The same angle as arccos((trace - 1) / 2), but exact near 0: ANTs writes its matrix in single
    # precision, where the trace alone rounds errors under about 0.03 degrees to 0.
    sine = np.linalg.norm([residual[2, 1] - residual[1, 2], residual[0, 2] - residual[2, 0],
                           residual[1, 0] - residual[0, 1]]) / 2
    angle = np.degrees(np.arctan2(sine, (np.trace(residual) - 1) / 2))
    return float(np.linalg.norm((found - expected) @ points, axis=0).max()), float(angle)


def score_head(seed, data_dir):
    """Per later run and library: (displacement error mm, rotation error degrees, seconds)."""
    bids_dir = data_dir / f'bids_{seed}'
    shutil.rmtree(bids_dir, ignore_errors=True)
    phantom, transforms = simulate_orientations(bids_dir, TURNS, voxel_size_mm=VOXEL_SIZE_MM, seed=seed,
                                                anisotropy_ppm=ANISOTROPY_PPM, resample=True)
    anat, truth = bids_dir / 'sub-01' / 'anat', bids_dir / 'derivatives' / 'truth' / 'sub-01' / 'anat'
    reference, reference_affine = _load(anat / 'sub-01_run-1_echo-1_part-mag_MEGRE.nii.gz')
    reference_mask = _load(truth / 'sub-01_run-1_desc-brain_mask.nii.gz')[0] > 0
    brain = phantom['brain_mask'] > 0
    points = reference_affine @ np.c_[np.argwhere(brain), np.ones(int(brain.sum()))].T
    rows = []
    for run in range(2, len(TURNS) + 1):
        moving, moving_affine = _load(anat / f'sub-01_run-{run}_echo-1_part-mag_MEGRE.nii.gz')
        moving_mask = _load(truth / f'sub-01_run-{run}_desc-brain_mask.nii.gz')[0] > 0
        row = {}
        for library, register in zip(LIBRARIES, (register_qsmprep, register_qsmprep_both_masks, register_ants)):
            started = time.perf_counter()
            found = register(moving, moving_affine, moving_mask, reference, reference_affine, reference_mask)
            seconds = time.perf_counter() - started
            row[library] = transform_errors(found, transforms[run - 1], points) + (seconds,)
            print(f'seed {seed} run {run} {library}: {row[library][0]:.3f} mm, {row[library][1]:.3f} deg, '
                  f'{seconds:.1f} s', flush=True)
        rows.append(row)
    return rows


def write_table(path, results, command):
    import ants

    lines = ['# Rigid registration of head orientations: qsmprep (SimpleITK) against ANTsPy', '',
             f'Made by `{command}` on {platform.machine()}, {os.cpu_count()} cores, {time.strftime("%Y-%m-%d")}; '
             f'SimpleITK {sitk.Version.VersionString()}, ANTsPy (antspyx) {ants.__version__}, '
             f'{THREADS} threads each. See the script\'s docstring for the heads and the settings.', '',
             'Each cell: largest displacement error over the true brain (mm) / rotation error (degrees) / '
             'wall seconds of the registration.']
    header = '| run (turn, degrees about scanner axis) | ' + ' | '.join(LIBRARIES) + ' |'
    for seed, rows in results.items():
        lines += ['', f'## Seed {seed}', '', header, '|---|' + '---|' * len(LIBRARIES)]
        for run, row in enumerate(rows, start=2):
            lines.append(f'| run {run} {TURNS[run - 1]} | ' + ' | '.join(
                f'{row[library][0]:.3f} / {row[library][1]:.3f} / {row[library][2]:.1f}' for library in LIBRARIES)
                + ' |')
        means = {library: np.mean([row[library] for row in rows], axis=0) for library in LIBRARIES}
        lines.append('| mean | ' + ' | '.join(
            f'{means[library][0]:.3f} / {means[library][1]:.3f} / {means[library][2]:.1f}' for library in LIBRARIES)
            + ' |')
    Path(path).write_text('\n'.join(lines) + '\n')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=Path('benchmarks/REGISTRATION.md'))
    parser.add_argument('--data', type=Path, default=Path('/tmp/qsmprep_registration_comparison'))
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    args = parser.parse_args()
    try:
        import ants
    except ImportError:
        sys.exit(MISSING_ANTS)
    # The preset's only seed: without it, each run samples other voxels.
    ants.config._random_seed = ANTS_SEED
    args.data.mkdir(parents=True, exist_ok=True)
    results = {seed: score_head(seed, args.data) for seed in args.seeds}
    command = f'python benchmarks/registration_comparison.py --out {args.out} --seeds {" ".join(map(str, args.seeds))}'
    write_table(args.out, results, command)
    print(Path(args.out).read_text())


if __name__ == '__main__':
    main()
