"""``qsmprep``: parse, check the input, build the workflow, run it, describe the derivatives."""
import json
import logging
import os
import sys
import time
from pathlib import Path

from ..bids import InputError, check_user_mask, collect_megre_series
from ..learned import missing_torch_message, shipped_lpcnn_voxel_size_range_mm
from ..methods import LEARNED_INVERSIONS
from ..settings import Settings
from .parser import build_parser

logger = logging.getLogger('qsmprep')


def _fail(message, code=1):
    print(f'qsmprep: error: {message}', file=sys.stderr)
    return code


def write_dataset_description(output_dir, bids_dir):
    from ..interfaces.derivatives import BIDSIGNORE
    from ..interfaces.derivatives import generated_by

    output_dir.mkdir(parents=True, exist_ok=True)
    description = {
        'Name': 'qsmprep derivatives', 'BIDSVersion': '1.10.0', 'DatasetType': 'derivative',
        'GeneratedBy': generated_by(os.environ.get('QSMPREP_CONTAINER')),
        'DatasetLinks': {'raw': str(bids_dir)},
    }
    (output_dir / 'dataset_description.json').write_text(json.dumps(description, indent=2) + '\n')
    (output_dir / '.bidsignore').write_text(BIDSIGNORE + 'logs/\n')


def _configure_nipype(work_dir, verbosity, resource_monitor):
    from nipype import config, logging as nipype_logging

    # Nipype's log-to-file with MultiProc can hang with filelock >= 3.30, so logs go to the console only.
    # MultiProc looks for finished and ready nodes every poll_sleep_duration seconds; its default
    # of 2 s left the cores idle for about 10 s of a 1 mm participant's 80. Inputs are hashed by
    # path and modification time, as fMRIPrep does: hashing the content of every 4-D file before
    # each node cost another 1 to 2 s per node, and a changed file still gets a new time.
    config.update_config({
        'logging': {'log_to_file': False, 'workflow_level': ['WARNING', 'INFO', 'DEBUG'][min(verbosity, 2)]},
        'execution': {'crashdump_dir': str(work_dir / 'crash'), 'crashfile_format': 'txt',
                      'remove_unnecessary_outputs': False, 'stop_on_first_crash': False,
                      'hash_method': 'timestamp', 'poll_sleep_duration': 0.1},
    })
    if resource_monitor:
        config.enable_resource_monitor()
    nipype_logging.update_logging(config)


def _crash_summary(crash_dir, since):
    """One line per node that crashed after ``since``: the node and the last line of its traceback."""
    lines = []
    for crash_file in sorted(Path(crash_dir).glob('crash-*.txt')):
        if crash_file.stat().st_mtime < since:
            continue
        text = crash_file.read_text().strip().splitlines()
        node = next((line.split(':', 1)[1].strip() for line in text if line.startswith('Node:')), crash_file.name)
        lines.append(f'  {node}: {text[-1].strip() if text else "?"} (report: {crash_file})')
    return '\n'.join(lines)


def main(argv=None):
    settings = Settings.from_arguments(build_parser().parse_args(argv))
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter('%(asctime)s qsmprep %(levelname)s: %(message)s'))
    logger.addHandler(handler)
    logger.setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(settings.verbose, 2)])
    if settings.analysis_level == 'group':
        return _fail('the group level is not implemented yet; run the participant level.', code=2)
    if settings.output_dir == settings.bids_dir:
        return _fail(f'{settings.output_dir}: the output folder is the input dataset; write derivatives '
                     f'elsewhere, e.g. {settings.bids_dir / "derivatives" / "qsmprep"}.')
    try:
        series_list, errors = collect_megre_series(
            settings.bids_dir, settings.participant_label, settings.session_label,
            validate=not settings.skip_bids_validation, field_strength_override=settings.field_strength)
    except InputError as error:
        return _fail(str(error))
    for message in errors:
        print(f'qsmprep: error: {message} (this series is skipped)', file=sys.stderr)
    if not series_list:
        return _fail('no MEGRE series passed the checks; nothing was run.')
    if settings.mask is not None:
        if len(series_list) > 1:
            return _fail(f'{settings.mask}: --mask serves one series, but {len(series_list)} were selected; select '
                         f'one with --participant-label and --session-label.')
        try:
            check_user_mask(settings.mask, series_list[0])
        except InputError as error:
            return _fail(str(error))

    if settings.inversion in LEARNED_INVERSIONS:
        torch_message = missing_torch_message(f'--inversion {settings.inversion}')
        if torch_message:
            return _fail(torch_message, code=2)
        smallest, largest = shipped_lpcnn_voxel_size_range_mm()
        for series in series_list:
            if min(series.voxel_size_mm) < smallest or max(series.voxel_size_mm) > largest:
                logger.warning('%s: voxels of %s mm, outside the %g-%g mm that the shipped LP-CNN was trained on; '
                               'its map may be less accurate than on data inside that range', series.name,
                               [round(v, 2) for v in series.voxel_size_mm], smallest, largest)

    _configure_nipype(settings.work_dir, settings.verbose, settings.resource_monitor)
    from ..workflows.base import init_qsmprep_wf

    settings.work_dir.mkdir(parents=True, exist_ok=True)
    qsmprep_wf = init_qsmprep_wf(series_list=series_list, settings=settings)
    for series in series_list:
        logger.info('%s: %d echoes, %.1f T, B0 direction %s (from %s)', series.name, len(series.echo_times_s),
                    series.field_strength_t, [round(v, 3) for v in series.b0_dir], series.b0_dir_source)
    plugin, plugin_args = ('MultiProc', {'n_procs': settings.nprocs}) if settings.nprocs > 1 else ('Linear', {})
    started = time.time()
    failed = False
    # Nipype's resource monitor writes its logs into the current folder: keep them in the work
    # directory (every path handed to the workflow is absolute).
    launch_dir = os.getcwd()
    os.chdir(settings.work_dir)
    try:
        qsmprep_wf.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError:
        failed = True
    finally:
        os.chdir(launch_dir)
        write_dataset_description(settings.output_dir, settings.bids_dir)
        log = settings.output_dir / 'logs' / f'qsmprep_{time.strftime("%Y%m%d-%H%M%S")}.toml'
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(settings.to_toml())
    if failed:
        return _fail(f'some processing steps failed; the series they belong to have no derivatives:\n'
                     f'{_crash_summary(settings.work_dir / "crash", started)}')
    print(f'qsmprep: {len(series_list)} series done in {time.time() - started:.0f} s; derivatives in '
          f'{settings.output_dir}')
    return 1 if errors else 0


if __name__ == '__main__':
    sys.exit(main())
