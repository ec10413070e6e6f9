"""``qsmprep``: parse, check the folders and the input, build the workflow, run it, report per series."""
import json
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path

from ..bids import InputError, check_user_mask, collect_megre_series
from ..files import remove_temporary_files, write_text_atomically
from ..learned import missing_torch_message, shipped_voxel_size_range_mm
from ..methods import INVERSIONS, LEARNED_INVERSIONS, STI_METHODS
from ..settings import Settings
from .parser import build_parser
from .progress import StageProgress, count_stages

logger = logging.getLogger('qsmprep')


class Interrupted(BaseException):
    """SIGINT or SIGTERM: a BaseException, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signal_number):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


def _fail(message, code=1):
    print(f'qsmprep: error: {message}', file=sys.stderr)
    return code


def _stop_on_signals():
    """SIGINT and SIGTERM raise ``Interrupted`` in this process; worker processes forked from it
    exit at once instead (a scheduler's SIGTERM reaches them through ``_stop_workers``)."""
    main_pid = os.getpid()

    def handler(signal_number, frame):
        if os.getpid() != main_pid:
            os._exit(128 + signal_number)
        raise Interrupted(signal_number)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _stop_workers(grace_s=2.0):
    """Stop every process this one started: SIGTERM, then SIGKILL for those still running."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def _is_within(path, folder):
    return path == folder or folder in path.parents


def _probe_writable(folder):
    """Raise ``OSError`` unless a file can be written in ``folder``; what the probe creates, it removes."""
    missing = [parent for parent in [folder, *folder.parents] if not parent.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        probe = folder / f'.qsmprep-probe-{os.getpid()}'
        probe.write_text('')
        probe.unlink()
    finally:
        for created in missing:
            if created.is_dir():
                created.rmdir()


def _generated_by_names(output_dir):
    """Names in the ``GeneratedBy`` of ``output_dir``'s dataset_description.json; None without one."""
    description = output_dir / 'dataset_description.json'
    if not description.exists():
        return None
    try:
        return [str(entry.get('Name')) for entry in json.loads(description.read_text()).get('GeneratedBy', [])]
    except (ValueError, AttributeError, OSError):
        return ['(unreadable dataset_description.json)']


def check_folders(settings):
    """The message that refuses the output and work folders, or None: they must not be the input,
    the output must be empty or qsmprep's own, and both must be writable, before anything runs."""
    bids_dir, output_dir, work_dir = (path.resolve() for path in (settings.bids_dir, settings.output_dir,
                                                                   settings.work_dir))
    if _is_within(bids_dir, output_dir):
        return (f'{settings.output_dir}: the output folder is (or holds) the input dataset; write derivatives '
                f'elsewhere, e.g. {settings.bids_dir / "derivatives" / "qsmprep"}.')
    if _is_within(output_dir, bids_dir) and not _is_within(output_dir, bids_dir / 'derivatives'):
        return (f'{settings.output_dir}: the output folder is inside the input dataset but not in its derivatives/ '
                f'folder; use e.g. {settings.bids_dir / "derivatives" / "qsmprep"}.')
    if _is_within(work_dir, bids_dir):
        return (f'{settings.work_dir}: the work folder is inside the input dataset, where it would be indexed '
                f'as data; put it elsewhere with -w.')
    if _is_within(work_dir, output_dir) or _is_within(output_dir, work_dir):
        return (f'{settings.work_dir}: the work folder and the output folder overlap; give them separate places '
                f'with -w.')
    if output_dir.exists():
        if not output_dir.is_dir():
            return f'{settings.output_dir}: the output folder is a file; give a folder.'
        names = _generated_by_names(output_dir)
        if names is not None and 'qsmprep' not in names:
            return (f'{settings.output_dir / "dataset_description.json"}: the output folder holds the derivatives of '
                    f'{", ".join(names) or "another pipeline"} (GeneratedBy); qsmprep writes only into its own or '
                    f'an empty folder: choose another, e.g. {settings.output_dir.parent / "qsmprep"}.')
        if names is None and any(path.name != 'logs' for path in output_dir.iterdir()):
            return (f'{settings.output_dir}: the output folder is not empty and has no dataset_description.json of '
                    f'qsmprep; qsmprep writes only into its own or an empty folder: choose another.')
    for folder, option in ((output_dir, 'the output folder'), (work_dir, 'the work folder (-w)')):
        try:
            _probe_writable(folder)
        except OSError as error:
            return f'{folder}: {option} cannot be written ({error.strerror or error}); choose a writable place.'
    return None


def write_dataset_description(output_dir, bids_dir):
    from ..interfaces.derivatives import BIDSIGNORE
    from ..interfaces.derivatives import generated_by

    output_dir.mkdir(parents=True, exist_ok=True)
    description = {
        'Name': 'qsmprep derivatives', 'BIDSVersion': '1.10.0', 'DatasetType': 'derivative',
        'GeneratedBy': generated_by(os.environ.get('QSMPREP_CONTAINER')),
        'DatasetLinks': {'raw': str(bids_dir)},
    }
    write_text_atomically(output_dir / 'dataset_description.json', json.dumps(description, indent=2) + '\n')
    # The reports are fMRIPrep's shape: sub-<l>.html beside the subjects, figures inside them (the
    # validator ignores a folder by its name without the trailing slash).
    write_text_atomically(output_dir / '.bidsignore', BIDSIGNORE + 'logs/\n*.html\nsub-*/figures\n')


def _configure_nipype(work_dir, verbosity, resource_monitor, log_file):
    from nipype import config, logging as nipype_logging

    # Nipype's log-to-file with MultiProc can hang with filelock >= 3.30: its messages and
    # tracebacks go to the run's log through a plain handler instead, and not to the terminal.
    # MultiProc looks for finished and ready nodes every poll_sleep_duration seconds; its default
    # of 2 s left the cores idle for about 10 s of a 1 mm participant's 80. Inputs are hashed by
    # path and modification time, as fMRIPrep does: hashing the content of every 4-D file before
    # each node cost another 1 to 2 s per node, and a changed file still gets a new time.
    config.update_config({
        'logging': {'log_to_file': False, 'workflow_level': ['INFO', 'INFO', 'DEBUG'][min(verbosity, 2)]},
        'execution': {'crashdump_dir': str(work_dir / 'crash'), 'crashfile_format': 'txt',
                      'remove_unnecessary_outputs': False, 'stop_on_first_crash': False,
                      'hash_method': 'timestamp', 'poll_sleep_duration': 0.1},
    })
    if resource_monitor:
        config.enable_resource_monitor()
    nipype_logging.update_logging(config)
    nipype_logger = logging.getLogger('nipype')
    for handler in list(nipype_logger.handlers):
        nipype_logger.removeHandler(handler)
    file_handler = logging.FileHandler(log_file, encoding='utf-8')
    file_handler.setFormatter(logging.Formatter('%(asctime)s %(name)s %(levelname)s: %(message)s'))
    nipype_logger.addHandler(file_handler)
    if verbosity:
        # Nipype's own messages reach the terminal only when asked for; the stage lines always do.
        terminal_handler = logging.StreamHandler()
        terminal_handler.setFormatter(logging.Formatter('%(asctime)s %(name)s %(levelname)s: %(message)s'))
        nipype_logger.addHandler(terminal_handler)
    logger.addHandler(file_handler)
    # The process pool reports its broken futures when the run is stopped: to the log, not the terminal.
    logging.getLogger('concurrent.futures').addHandler(file_handler)


def _crashes(crash_dir, since, series_list):
    """Per series name, one line per node of it that crashed after ``since``: the step, the last
    line of its traceback and the file with the whole of it."""
    crashes = {}
    for crash_file in sorted(Path(crash_dir).glob('crash-*.txt')):
        if crash_file.stat().st_mtime < since:
            continue
        text = crash_file.read_text().strip().splitlines()
        node = next((line.split(':', 1)[1].strip() for line in text if line.startswith('Node:')), crash_file.name)
        owner = next((series.name for series in series_list if f'series_{series.workflow_name}_wf' in node), None)
        if owner is None:  # a combination of orientations, or a step outside every series
            owner = node.split('.head_')[1].split('_wf')[0] + ' (orientations)' if '.head_' in node else 'other'
        step = node.split('.')[-1]
        crashes.setdefault(owner, []).append(f'{step} failed: {text[-1].strip() if text else "?"} '
                                             f'(traceback: {crash_file})')
    return crashes


def _write_reports(settings, done_series, crashes, log_file, run_uuid):
    """Write the HTML report of every subject with finished series; a report that fails is named by
    its subject (the derivatives stay), the others are written."""
    from ..reports.subject import mentions_subject, write_subject_report

    failures = {}
    subjects = sorted({series.entities['subject'] for series in done_series})
    for subject in subjects:
        errors = [f'{name}: {line}' for name, lines in crashes.items() if mentions_subject(name, subject)
                  for line in lines]
        try:
            path = write_subject_report(settings.output_dir, subject,
                                        [series for series in done_series if series.entities['subject'] == subject],
                                        settings.work_dir / 'reportlets', run_uuid, log_file, errors)
        except Exception as error:  # the report must not hide the derivatives, which are complete
            logger.exception('report of sub-%s', subject)
            failures[f'sub-{subject} report'] = (f'the report of sub-{subject} could not be written ({error}); its '
                                                 f'derivatives are complete. Details in {log_file}')
        else:
            print(f'qsmprep: report of sub-{subject}: {path}', flush=True)
    return failures


def main(argv=None):
    settings = Settings.from_arguments(build_parser().parse_args(argv))
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter('%(asctime)s qsmprep %(levelname)s: %(message)s'))
    logger.addHandler(handler)
    logger.setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(settings.verbose, 2)])
    if settings.analysis_level == 'group':
        return _run_group(settings)
    _stop_on_signals()
    try:
        return _run_participants(settings)
    except Interrupted as interruption:
        _stop_workers()
        remove_temporary_files(settings.output_dir)
        print(f'qsmprep: stopped by {interruption}; no series was left half-written. A rerun with the same work '
              f'folder (-w {settings.work_dir}) resumes.', file=sys.stderr)
        return 128 + interruption.signal_number


def _run_group(settings):
    from ..group import GroupError, run_group

    names = _generated_by_names(settings.output_dir)
    if names is None or 'qsmprep' not in names:
        return _fail(f'{settings.output_dir}: not a qsmprep output folder (no dataset_description.json of qsmprep); '
                     'give the folder the participant level wrote.')
    started = time.time()
    try:
        rows = run_group(settings.output_dir, settings.bids_dir, settings.participant_label, settings.session_label,
                         settings.template, settings.atlas, settings.nprocs)
    except GroupError as error:
        return _fail(str(error))
    folder = settings.output_dir / 'group'
    print(f'qsmprep: group level: {len({row["series"] for row in rows})} series in {time.time() - started:.0f} s; '
          f'{folder / "desc-regions_stats.tsv"}, page {folder / "regions.html"}')
    return 0


def _run_participants(settings):
    refusal = check_folders(settings)
    if refusal:
        return _fail(refusal)
    try:
        series_list, errors = collect_megre_series(
            settings.bids_dir, settings.participant_label, settings.session_label,
            validate=not settings.skip_bids_validation, field_strength_override=settings.field_strength)
    except InputError as error:
        return _fail(str(error))
    for name, message in errors.items():
        print(f'qsmprep: error: {name} is skipped: {message}', file=sys.stderr)
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

    if settings.sti and not settings.multi_orientation:
        return _fail(f'--sti {settings.sti} combines several head orientations; add --multi-orientation.', code=2)
    if settings.sti and STI_METHODS[settings.sti].learned:
        torch_message = missing_torch_message(f'--sti {settings.sti}')
        if torch_message:
            return _fail(torch_message, code=2)
    if settings.inversion in LEARNED_INVERSIONS:
        torch_message = missing_torch_message(f'--inversion {settings.inversion}')
        if torch_message:
            return _fail(torch_message, code=2)
        smallest, largest = shipped_voxel_size_range_mm(settings.inversion)
        for series in series_list:
            if min(series.voxel_size_mm) < smallest or max(series.voxel_size_mm) > largest:
                logger.warning('%s: voxels of %s mm, outside the %g-%g mm that the shipped %s was trained on; '
                               'its map may be less accurate than on data inside that range', series.name,
                               [round(v, 2) for v in series.voxel_size_mm], smallest, largest,
                               INVERSIONS[settings.inversion].model_name)

    # Each run keeps its own settings and log, even when several run into one folder at once.
    write_dataset_description(settings.output_dir, settings.bids_dir)
    remove_temporary_files(settings.output_dir)
    logs = settings.output_dir / 'logs'
    logs.mkdir(exist_ok=True)
    stem = f'qsmprep_{time.strftime("%Y%m%d-%H%M%S")}_{uuid.uuid4().hex[:8]}'
    write_text_atomically(logs / f'{stem}.toml', settings.to_toml())
    log_file = logs / f'{stem}.log'
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    _configure_nipype(settings.work_dir, settings.verbose, settings.resource_monitor, log_file)
    from ..workflows.base import init_qsmprep_wf

    qsmprep_wf = init_qsmprep_wf(series_list=series_list, settings=settings)
    for series in series_list:
        logger.info('%s: %d echoes, %.1f T, B0 direction %s (from %s)', series.name, len(series.echo_times_s),
                    series.field_strength_t, [round(v, 3) for v in series.b0_dir], series.b0_dir_source)
    plugin, plugin_args = ('MultiProc', {'n_procs': settings.nprocs}) if settings.nprocs > 1 else ('Linear', {})
    progress = StageProgress(series_list, total=count_stages(qsmprep_wf))
    plugin_args['status_callback'] = progress
    started = time.time()
    # Nipype's resource monitor writes its logs into the current folder: keep them in the work
    # directory (every path handed to the workflow is absolute).
    launch_dir = os.getcwd()
    os.chdir(settings.work_dir)
    try:
        qsmprep_wf.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError:
        pass  # the crash files say which steps failed
    finally:
        progress.close()
        os.chdir(launch_dir)
    crashes = _crashes(settings.work_dir / 'crash', started, series_list)
    for name, lines in crashes.items():
        for line in lines:
            print(f'qsmprep: error: {name}: {line}', file=sys.stderr)
    done = [series.name for series in series_list if series.name not in crashes]
    report_failures = _write_reports(settings, [series for series in series_list if series.name in done], crashes,
                                     log_file, stem)
    for line in report_failures.values():
        print(f'qsmprep: error: {line}', file=sys.stderr)
    failed = sorted(set(errors) | set(crashes))
    summary = (f'qsmprep: {len(done)} of {len(done) + len(failed)} series done in {time.time() - started:.0f} s; '
               f'derivatives in {settings.output_dir}; log: {log_file}')
    if failed:
        summary += f'\nqsmprep: failed, without derivatives: {", ".join(failed)}'
    if report_failures:
        summary += f'\nqsmprep: reports not written: {", ".join(report_failures)}'
    with open(log_file, 'a', encoding='utf-8') as log:
        log.write(summary + '\n')
    print(summary, file=sys.stderr if failed or report_failures else sys.stdout)
    return 1 if failed or report_failures else 0


if __name__ == '__main__':
    sys.exit(main())
