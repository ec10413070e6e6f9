"""One participant at 1 mm whole head through `qsmprep ... participant`: accuracy, time and memory.

    python benchmarks/pipeline_benchmark.py --out benchmarks/RESULTS.md [--data DIR] [--voxel-size 1]

Simulates (once, into --data) an upright head and the same head tilted by 18 degrees (B0
direction only in the affine), runs the real command line on each with its defaults (every
core of this machine), and writes a Markdown table of each stage's wall time, the whole run's
peak memory and the Chimap's accuracy against the truth. Nothing here is tuned on the in-vivo
benchmark data.

Times come from Nipype's record of each node; memory from polling the resident memory of the
command and all its worker processes together. Nipype's own resource monitor is not used: on
2 cores it slowed the run it measured (1 mm head: 124 s with it, 89 s without).
"""
import argparse
import os
import gzip
import pickle
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.evaluate import evaluate_subject  # noqa: E402
from benchmarks.simulate_bids import simulate_dataset  # noqa: E402

STAGES = ('load_megre', 'brain_mask', 'fit_r2star', 'unwrap_phase', 'fit_total_field', 'remove_background',
          'invert', 'separate_sources', 'derivatives_sink')
SUBJECTS = {'01': 'upright', '02': 'tilted 18 degrees (B0 direction from the affine only)'}


def node_runtime(work_dir, label, stage):
    """Duration (s) Nipype recorded for one node."""
    matches = list(Path(work_dir).glob(f'qsmprep_wf/**/series_sub_{label}_wf/**/{stage}/result_{stage}.pklz'))
    if not matches:
        return float('nan')
    with gzip.open(matches[0], 'rb') as handle:
        runtime = pickle.load(handle).runtime
    return float(getattr(runtime, 'duration', float('nan')))


def run_measured(command, poll_seconds=0.2):
    """Run ``command`` (checked); returns its wall time (s) and the peak resident memory (GB) of
    the process and its descendants together."""
    process = subprocess.Popen(command)
    peak = [0]

    def poll():
        parent = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                total = sum(p.memory_info().rss for p in [parent] + parent.children(recursive=True))
                peak[0] = max(peak[0], total)
            except psutil.Error:  # a worker ended between listing and reading: read again next time
                pass
            time.sleep(poll_seconds)

    started = time.time()
    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    code = process.wait()
    wall = time.time() - started
    watcher.join()
    if code:
        raise subprocess.CalledProcessError(code, command)
    return wall, peak[0] / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=Path('benchmarks/RESULTS.md'))
    parser.add_argument('--data', type=Path, default=Path('/tmp/qsmprep_benchmark'))
    parser.add_argument('--voxel-size', type=float, default=1.0)
    args = parser.parse_args()
    bids_dir, output_dir = args.data / 'bids', args.data / 'derivatives'
    if not (bids_dir / 'dataset_description.json').exists():
        started = time.time()
        simulate_dataset(bids_dir, voxel_size_mm=args.voxel_size, tilts_deg=(0.0, 18.0))
        print(f'simulated in {time.time() - started:.0f} s', flush=True)
    qsmprep = str(Path(sys.executable).with_name('qsmprep'))
    rows, accuracy = [], []
    for label, description in SUBJECTS.items():
        work_dir = args.data / f'work_{label}'
        # A fresh work directory: a resumed run would skip the cached stages and time only the rest.
        shutil.rmtree(work_dir, ignore_errors=True)
        command = [qsmprep, str(bids_dir), str(output_dir), 'participant', '--participant-label', label,
                   '-w', str(work_dir)]
        wall, peak_gb = run_measured(command)
        stage_times = {stage: node_runtime(work_dir, label, stage) for stage in STAGES}
        rows.append((label, wall, peak_gb, stage_times))
        accuracy.append((label, description, evaluate_subject(output_dir, bids_dir, label)))

    lines = [
        '# qsmprep pipeline benchmark',
        '',
        f'Simulated {args.voxel_size:g} mm whole head (MNI152 2009a tissue maps, skull, scalp, sinuses and air; '
        '3 T, 5 echoes 4-28 ms, peak SNR 100), one participant per run, on '
        f'{platform.machine()} with {os.cpu_count()} cores, all defaults: ROMEO-like unwrapping, complex echo fit, '
        'two-pass mask, V-SHARP, TV inversion, chi-separation. Made by:',
        '',
        f'    python benchmarks/pipeline_benchmark.py --out {args.out} --voxel-size {args.voxel_size:g}',
        '',
        '## Accuracy of the Chimap against the truth',
        '',
        'Over the true brain mask inside qsmprep\'s output mask, both referenced to their mean there.',
        '',
        '| subject | head | NRMSE % | HFEN % | XSIM | mask covers true brain % | R2* NRMSE % |',
        '|---|---|---|---|---|---|---|',
    ]
    for label, description, scores in accuracy:
        lines.append(f'| {label} | {description} | {scores["chi_nrmse"]:.1f} | {scores["chi_hfen"]:.1f} | '
                     f'{scores["chi_xsim"]:.3f} | {100 * scores["mask_coverage"]:.1f} | {scores["r2star_nrmse"]:.1f} |')
    lines += ['', '## Wall time (s) per stage and of the whole run', '',
              'Inversion and chi-separation run side by side, with one core each.', '',
              '| stage | ' + ' | '.join(f'sub-{label}' for label, *_ in rows) + ' |',
              '|---|' + '---|' * len(rows)]
    for stage in STAGES:
        lines.append(f'| {stage} | ' + ' | '.join(f'{times[stage]:.1f}' for *_, times in rows) + ' |')
    lines.append('| whole command (incl. start-up and BIDS indexing) | '
                 + ' | '.join(f'{wall:.0f}' for _, wall, _, _ in rows) + ' |')
    lines.append('| peak memory of the run, all processes (GB) | '
                 + ' | '.join(f'{peak:.2f}' for _, _, peak, _ in rows) + ' |')
    args.out.write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
