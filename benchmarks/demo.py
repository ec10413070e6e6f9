"""`make demo`: simulate a small MEGRE dataset, run qsmprep on it, say where the results are and how good.

    python benchmarks/demo.py DEMO_DIR

DEMO_DIR/bids is a 2 mm simulated head (3 T, 5 echoes); DEMO_DIR/derivatives/qsmprep gets the
output. Scores are over the true brain mask inside qsmprep's brain mask.
"""
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.evaluate import evaluate_subject  # noqa: E402
from benchmarks.simulate_bids import simulate_dataset  # noqa: E402


def main():
    demo_dir = Path(sys.argv[1] if len(sys.argv) > 1 else 'demo').absolute()
    bids_dir, output_dir, work_dir = demo_dir / 'bids', demo_dir / 'derivatives' / 'qsmprep', demo_dir / 'work'
    if not (bids_dir / 'dataset_description.json').exists():
        print(f'simulating a 2 mm head into {bids_dir} ...', flush=True)
        simulate_dataset(bids_dir, voxel_size_mm=2.0, tilts_deg=(0.0,))
    qsmprep = Path(sys.executable).with_name('qsmprep')
    command = [str(qsmprep), str(bids_dir), str(output_dir), 'participant', '-w', str(work_dir), '--nprocs', '2']
    print('running:', ' '.join(command), flush=True)
    started = time.time()
    subprocess.run(command, check=True)
    scores = evaluate_subject(output_dir, bids_dir, '01')
    print(f'\nqsmprep finished in {time.time() - started:.0f} s')
    print(f'derivatives: {output_dir}')
    print(f'Chimap:      {scores["chimap"]}')
    print(f'Chimap against the simulated truth: NRMSE {scores["chi_nrmse"]:.1f} %, XSIM {scores["chi_xsim"]:.3f}, '
          f'HFEN {scores["chi_hfen"]:.1f} %')
    print(f'R2* NRMSE {scores["r2star_nrmse"]:.1f} %; brain mask covers {100 * scores["mask_coverage"]:.1f} % '
          f'of the true brain')


if __name__ == '__main__':
    main()
