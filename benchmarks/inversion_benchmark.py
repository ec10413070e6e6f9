"""Every dipole inversion method on the 2016 QSM challenge in-vivo data and on simulated heads.

    python benchmarks/inversion_benchmark.py --out benchmarks/INVERSION.md

Evaluation only: every qsmprep parameter and weight rule was fixed on simulations before this
script ran on the challenge data, and nothing here feeds back into them. The published
reconstructions in ``published/`` are scored by the same code: they are stored flipped along
array axis 1, and QSMnet/QSMnet+ are zero-padded to 164x173x173 with the challenge grid at
offset (2, 6, 6) after the flip (the data's README). Each qsmprep method runs in a child
process so that its peak memory is its own; LP-CNN (the shipped model) runs on the CPU with
two threads unless ``--device cuda``.

The multi-orientation section simulates one head fixed on its voxel grid under several B0
directions, as registered multi-orientation data arrive, and compares TV on the first
orientation with LP-CNN and LPN given the first one, two and three. The model-error section adds to the
simulated head what a scalar dipole model does not explain (benchmarks/weight_calibration.py):
white matter's susceptibility anisotropy, and white noise stronger than LP-CNN trained on.
"""
import argparse
import multiprocessing
import os
import platform
import queue
import resource
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.fft
import scipy.io
from scipy.spatial.transform import Rotation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.simulate_bids import (CHI_AIR, ECHO_TIMES_S, FIELD_STRENGTH_T, head_phantom,  # noqa: E402
                                      simulate_megre, tilted_affine, voxel_averaged_field)
from benchmarks.weight_calibration import simulated_case  # noqa: E402
from qsmprep.learned.phantoms import FIBRE_SMOOTHING_MM  # noqa: E402
from qsmprep.methods import INVERSIONS, LEARNED_INVERSIONS  # noqa: E402
from qsmprep.science import bgremove, inversion, masking, metrics  # noqa: E402

PUBLISHED = {'CFL2': None, 'QSMnet': (2, 6, 6), 'QSMnet+': (2, 6, 6)}
# The challenge's acquisition (its README): one echo at 25 ms, 2.8936 T.
CHALLENGE_ECHO_TIME_S = 0.025
CHALLENGE_FIELD_STRENGTH_T = 2.8936
SIMULATED_TILT_DEG = 18.0
# Head rotations (rotation vectors in degrees, scanner axes) of the multi-orientation section:
# the first is the single-orientation head's tilt; the others are as far from it as a head turns
# in a head coil (20 to 30 degrees).
ORIENTATION_ROTATIONS_DEG = ((SIMULATED_TILT_DEG, 0, 0), (-10, 25, 0), (5, -20, 15))
# (white matter anisotropy chi_parallel - chi_perpendicular, white noise), ppm, of the model-error
# section: anisotropy as large as the training simulator draws (simulate.SimulationConfig), and noise
# above its training's largest (0.005 ppm).
MODEL_ERRORS_PPM = ((0.03, 0.001), (0.0, 0.008))
MODEL_ERROR_METHODS = ('tv', 'l2') + LEARNED_INVERSIONS


def load_challenge(data_dir):
    data_dir = Path(data_dir)

    def image(name):
        return np.asanyarray(nib.load(data_dir / f'{name}.nii.gz').dataobj).astype(np.float32)

    return {
        'local_field': image('phs_tissue'), 'mask': image('msk') > 0, 'reference': image('chi_cosmos'),
        'chi33': image('chi_33'), 'magnitude': scipy.io.loadmat(data_dir / 'magn.mat')['magn'].astype(np.float32),
        'voxel_size': tuple(float(v) for v in scipy.io.loadmat(data_dir / 'spatial_res.mat')['spatial_res'].ravel()),
        'b0_dir': (0.0, 0.0, 1.0),
        'phase_scale': inversion.phase_scale_rad_per_ppm([CHALLENGE_ECHO_TIME_S], CHALLENGE_FIELD_STRENGTH_T),
    }


def simulated_head(voxel_size_mm=1.0, tilt_deg=SIMULATED_TILT_DEG):
    """The 1 mm simulated head tilted about x, its local field from V-SHARP of the true total field."""
    phantom, affine = head_phantom(voxel_size_mm)
    affine = tilted_affine(affine, tilt_deg)
    megre = simulate_megre(phantom, affine)
    voxel_size = (voxel_size_mm,) * 3
    local_field, mask = bgremove.vsharp(megre['total_field'], phantom['brain_mask'], voxel_size, megre['b0_dir'])
    return {
        'local_field': local_field, 'mask': mask, 'reference': np.where(mask, phantom['chi'], 0),
        'magnitude': masking.combined_magnitude(megre['magnitude']), 'voxel_size': voxel_size,
        'b0_dir': tuple(megre['b0_dir']),
        'phase_scale': inversion.phase_scale_rad_per_ppm(ECHO_TIMES_S, FIELD_STRENGTH_T),
    }


def published_result(data_dir, name, offset, shape):
    volume = np.asanyarray(nib.load(Path(data_dir) / 'published' / f'result_{name}.nii.gz').dataobj)
    volume = np.flip(volume.astype(np.float32), axis=1)
    if offset is not None:
        volume = volume[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
    return volume


# The QSMnet-style baseline of ``qsmprep-train qsmnet``: a benchmark row, not one of qsmprep's inversions.
QSMNET_MODEL = Path(__file__).resolve().parent / 'models' / 'qsmnet'


def _invert(method, data, device):
    if method == 'qsmnet':
        import torch
        from qsmprep.learned.models import load_model, read_card
        from qsmprep.learned.qsmnet import qsmnet_invert
        torch.set_num_threads(2)
        fields = data.get('local_fields', [data['local_field']])
        b0_dirs = data.get('b0_dirs', [data['b0_dir']])
        chi = qsmnet_invert(fields, data['mask'], data['voxel_size'], b0_dirs, load_model(QSMNET_MODEL), device=device)
        return chi, {'Model': 'QSMnet', 'ModelTrainingSteps': read_card(QSMNET_MODEL)[0]['steps']}
    if method in ('lpcnn', 'lpn'):
        import torch
        from qsmprep.learned.models import invert_with_shipped
        torch.set_num_threads(2)
        fields = data.get('local_fields', [data['local_field']])
        b0_dirs = data.get('b0_dirs', [data['b0_dir']])
        return invert_with_shipped(method, fields, data['mask'], data['voxel_size'], b0_dirs, device=device)
    options = {'phase_scale_rad_per_ppm': data['phase_scale']} if method == 'nltv' else {}
    return inversion.invert(data['local_field'], data['mask'], data['voxel_size'], data['b0_dir'], method=method,
                            magnitude=data['magnitude'] if method in ('tv', 'nltv') else None, **options)


def _run_method(method, data, device, results):
    with scipy.fft.set_workers(2):
        started = time.time()
        chi, parameters = _invert(method, data, device)
        seconds = time.time() - started
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    results.put((chi, parameters, seconds, peak_gb))


def run_method(method, data, device='cpu'):
    """chi, chosen parameters, seconds and the child's peak resident memory (GB, data included)."""
    context = multiprocessing.get_context('fork')
    results = context.Queue()
    process = context.Process(target=_run_method, args=(method, data, device, results))
    process.start()
    # A child that fails (an exception, or killed for memory) sends nothing: wait for it only while it lives.
    while True:
        try:
            result = results.get(timeout=10)
            break
        except queue.Empty:
            if not process.is_alive():
                try:
                    result = results.get(timeout=10)
                    break
                except queue.Empty:
                    raise RuntimeError(f'{method} ended (exit code {process.exitcode}) without a result') from None
    process.join()
    return result


def scores(chi, data):
    mask, reference = data['mask'], data['reference']
    result = {
        'NRMSE': metrics.nrmse(chi, reference, mask), 'dNRMSE': metrics.dnrmse(chi, reference, mask),
        'HFEN': metrics.hfen(chi, reference, mask), 'XSIM': metrics.xsim(chi, reference, mask),
    }
    if 'chi33' in data:
        result['NRMSE_chi33'] = metrics.nrmse(chi, data['chi33'], mask)
    return result


def table(rows, with_chi33):
    header = '| method | NRMSE % | dNRMSE % | HFEN % | XSIM |' + (' NRMSE % vs chi33 |' if with_chi33 else '')
    lines = [header + ' weight | seconds | peak GB |',
             '|---' * (header.count('|') + 2) + '|']
    for name, score, weight, seconds, peak in rows:
        line = f'| {name} | {score["NRMSE"]:.1f} | {score["dNRMSE"]:.1f} | {score["HFEN"]:.1f} | {score["XSIM"]:.3f} |'
        if with_chi33:
            line += f' {score["NRMSE_chi33"]:.1f} |'
        lines.append(line + f' {weight} | {seconds} | {peak} |')
    return lines


def _chosen(parameters):
    """The table's ``weight`` column: what the method chose, or the model's training steps."""
    if 'ModelTrainingSteps' in parameters:
        return f'model of {parameters["ModelTrainingSteps"]} steps'
    return f'{parameters.get("RegularizationWeight", parameters.get("TKDThreshold")):.3g}'


def method_rows(data, methods, device):
    rows = []
    for method in methods:
        chi, parameters, seconds, peak_gb = run_method(method, data, device)
        rows.append((f'qsmprep {method}', scores(chi, data), _chosen(parameters), f'{seconds:.1f}', f'{peak_gb:.2f}'))
        print(rows[-1], flush=True)
    return rows


def multi_orientation_head(voxel_size_mm=1.0):
    """The simulated head under the B0 directions of ``ORIENTATION_ROTATIONS_DEG``, on one grid."""
    phantom, affine = head_phantom(voxel_size_mm)
    voxel_size = (voxel_size_mm,) * 3
    rotation_part = affine[:3, :3] / voxel_size_mm
    fields, b0_dirs = [], []
    for degrees in ORIENTATION_ROTATIONS_DEG:
        # The head rotates by R in the scanner, so B0 seen from the head turns by R^T.
        head_rotation = Rotation.from_rotvec(np.deg2rad(degrees)).as_matrix()
        b0_dir = rotation_part.T @ head_rotation.T @ np.array([0.0, 0.0, 1.0])
        total_field = voxel_averaged_field(phantom['chi'] - CHI_AIR, voxel_size, b0_dir)
        local_field, mask = bgremove.vsharp(total_field, phantom['brain_mask'], voxel_size, b0_dir)
        fields.append(local_field)
        b0_dirs.append(b0_dir)
    return {'local_fields': fields, 'b0_dirs': b0_dirs, 'local_field': fields[0], 'b0_dir': b0_dirs[0],
            'mask': mask, 'reference': np.where(mask, phantom['chi'], 0), 'voxel_size': voxel_size,
            'magnitude': None}


def orientation_rows(data, device):
    chi, parameters, seconds, peak_gb = run_method('tv', data)
    rows = [('qsmprep tv, 1 orientation', scores(chi, data), _chosen(parameters), f'{seconds:.1f}', f'{peak_gb:.2f}')]
    for method in LEARNED_INVERSIONS:
        for count in range(1, len(data['local_fields']) + 1):
            subset = {**data, 'local_fields': data['local_fields'][:count], 'b0_dirs': data['b0_dirs'][:count]}
            chi, parameters, seconds, peak_gb = run_method(method, subset, device)
            rows.append((f'qsmprep {method}, {count} orientation{"s" if count > 1 else ""}', scores(chi, data),
                         _chosen(parameters), f'{seconds:.1f}', f'{peak_gb:.2f}'))
            print(rows[-1], flush=True)
    return rows


def orientation_consistency_lines(data, device):
    """QSMnet's orientation consistency: each method maps every orientation of the head alone; the
    lines of a table of the standard deviation across those maps, averaged over the mask, and their
    mean NRMSE. A map that follows the data, not its orientation's artefacts, varies little."""
    mask = data['mask']
    lines = ['| method | spread across orientations, ppb | mean NRMSE % of the single-orientation maps |',
             '|---|---|---|']
    for method in ('tv',) + LEARNED_INVERSIONS:
        maps = []
        for field, b0_dir in zip(data['local_fields'], data['b0_dirs']):
            single = {**data, 'local_field': field, 'b0_dir': b0_dir, 'local_fields': [field], 'b0_dirs': [b0_dir]}
            chi = run_method(method, single, device)[0]
            maps.append(np.where(mask, chi - chi[mask].mean(), 0))
        spread_ppb = 1000 * float(np.std(maps, axis=0)[mask].mean())
        nrmse = np.mean([metrics.nrmse(chi, data['reference'], mask) for chi in maps])
        lines.append(f'| {method} | {spread_ppb:.2f} | {nrmse:.1f} |')
        print(lines[-1], flush=True)
    return lines


def model_error_rows(device, voxel_size_mm=1.0):
    phantom, affine = head_phantom(voxel_size_mm)
    affine = tilted_affine(affine, SIMULATED_TILT_DEG)
    rows = []
    for anisotropy_ppm, noise_ppm in MODEL_ERRORS_PPM:
        local_field, mask, voxel_size, b0_dir = simulated_case(phantom, affine, anisotropy_ppm, noise_ppm)
        data = {'local_field': local_field, 'mask': mask, 'reference': np.where(mask, phantom['chi'], 0),
                'voxel_size': voxel_size, 'b0_dir': tuple(b0_dir), 'magnitude': None}
        for method in MODEL_ERROR_METHODS:
            chi, parameters, seconds, peak_gb = run_method(method, data, device)
            rows.append((f'qsmprep {method}, anisotropy {anisotropy_ppm:g}, noise {noise_ppm:g}', scores(chi, data),
                         _chosen(parameters), f'{seconds:.1f}', f'{peak_gb:.2f}'))
            print(rows[-1], flush=True)
    return rows


def machine_description():
    return f'this {len(os.sched_getaffinity(0))}-core {platform.machine()} machine'


def _device_name(device):
    """Where LP-CNN ran and in which arithmetic its CNN ran there (``lpcnn.uses_bfloat16``)."""
    import torch
    from qsmprep.learned.lpcnn import uses_bfloat16

    arithmetic = 'bfloat16' if uses_bfloat16('auto', torch.device(device)) else 'float32'
    where = torch.cuda.get_device_name(0) if device == 'cuda' else f'{platform.machine()}, 2 threads'
    return f'{where}, CNN in {arithmetic}'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', type=Path, default=Path(__file__).resolve().parents[2] / 'shared' / 'benchmarks' / 'qsm2016')
    parser.add_argument('--out', type=Path, default=Path('benchmarks/INVERSION.md'))
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'), help='where LP-CNN runs')
    args = parser.parse_args()
    methods = tuple(INVERSIONS)

    challenge = load_challenge(args.data)
    challenge_rows = method_rows(challenge, methods, args.device)
    for name, offset in PUBLISHED.items():
        chi = published_result(args.data, name, offset, challenge['mask'].shape)
        challenge_rows.append((f'published {name}', scores(chi, challenge), '', '', ''))
    simulated_rows = method_rows(simulated_head(), methods, args.device)
    multi_orientation = multi_orientation_head()
    orientations = orientation_rows(multi_orientation, args.device)
    consistency = orientation_consistency_lines(multi_orientation, args.device)
    model_errors = model_error_rows(args.device)

    lines = [
        '# Dipole inversion: every method on the same data',
        '',
        f'Made on {machine_description()} by:',
        '',
        f'    python benchmarks/inversion_benchmark.py --out {args.out} --device {args.device}',
        '',
        'Metrics as CONVENTIONS.md defines them, both maps referenced to their mean over the mask;',
        'dNRMSE is the NRMSE after the best linear rescaling of the estimate (QSM challenge 2.0).',
        '`weight` is the regularisation weight each method chose by its own rule (relative to the',
        f'field scaled to unit RMS; GCV for L2, {inversion.TV_TO_L2_WEIGHT:g} times that for TV), the TKD threshold, '
        'or the training steps of the shipped LP-CNN. Seconds and peak memory (resident set of the child process, data',
        f'included) are for the inversion alone; LP-CNN ran on {args.device} ({_device_name(args.device)}).',
        '',
        '## 2016 QSM challenge, in vivo, against the 12-orientation COSMOS',
        '',
        'Local field of the challenge (3 T, 160x160x160, 1.06x1.06x1.07 mm), scored inside `msk`.',
        'Evaluation only: no qsmprep parameter was chosen by looking at these scores.',
        '',
        *table(challenge_rows, with_chi33=True),
        '',
        f'## Simulated 1 mm head, tilted {SIMULATED_TILT_DEG:g} degrees, against the true susceptibility',
        '',
        '`benchmarks/simulate_bids.py` head (3 T, 5 echoes); local field from V-SHARP of the true',
        'total field, scored over the V-SHARP mask.',
        '',
        *table(simulated_rows, with_chi33=False),
        '',
        '## Simulated 1 mm head under several B0 directions, against the true susceptibility',
        '',
        'The same head fixed on its grid, B0 turned by the head rotations (degrees, rotation vectors)',
        f'{", ".join(str(r) for r in ORIENTATION_ROTATIONS_DEG)}; local fields from V-SHARP of each true',
        'total field, scored over the V-SHARP mask. TV sees the first orientation; LP-CNN and LPN the first 1, 2, 3.',
        '',
        *table(orientations, with_chi33=False),
        '',
        'Orientation consistency (as QSMnet measured it): each orientation of the same head inverted',
        'alone, each map referenced to its mean over the mask; the standard deviation of the three maps',
        'at each voxel, averaged over the mask.',
        '',
        *consistency,
        '',
        '## Simulated 1 mm head with model error, against the true mean susceptibility',
        '',
        f'The head tilted {SIMULATED_TILT_DEG:g} degrees, its total field with white matter susceptibility anisotropy',
        f'(ppm, fibre directions smooth over {FIBRE_SMOOTHING_MM:g} mm) and white noise (ppm) added, local field from V-SHARP',
        '(benchmarks/weight_calibration.py); TV without magnitude weighting. No scalar map explains the',
        "anisotropy's field, and the noise is stronger than LP-CNN's training drew.",
        '',
        *table(model_errors, with_chi33=False),
    ]
    args.out.write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
