"""One terminal line per finished stage of a run, from Nipype's status callback, and on a terminal
a bar of the stages done with the running ones and how long each has run."""
import os
import sys
import threading
import time

from ..bids import series_name
from ..files import read_stage_progress

# The nodes that users know as stages, in the words the lines use; other nodes are bookkeeping.
STAGES = {
    'load_megre': 'read the echoes',
    'fit_r2star': 'R2* and T2*',
    'brain_mask': 'brain mask',
    'unwrap_phase': 'phase unwrapping',
    'fit_total_field': 'echo fit: total field and noise',
    'remove_background': 'background field removal',
    'invert': 'dipole inversion',
    'separate_sources': 'chi-separation',
    'derivatives_sink': 'writing the derivatives',
    'register_orientations': 'registration of the orientations',
    'cosmos': 'COSMOS',
    'sti_tensor': 'susceptibility tensor',
    'orientations_sink': 'writing the orientation derivatives',
}


REFRESH_S = 1.0  # how often the bar's running times are redrawn


def count_stages(workflow):
    """How many nodes of ``workflow`` (nested workflows included) are stages."""
    return sum(name.rsplit('.', 1)[-1] in STAGES for name in workflow.list_node_names())


def _terminal_width(stream):
    """Columns of the terminal ``stream`` writes to, None when unknown. A terminal of no width (a
    pseudo-terminal nobody sized) shows no bar."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return None


def _output_dir(node):
    """The working folder of a Nipype node, where its interface runs; None when it has none."""
    try:
        return node.output_dir()
    except (AttributeError, OSError):
        return None


class StageProgress:
    """Nipype's ``status_callback``: prints ``[elapsed] series: stage done in s`` when a stage ends
    (or failed when it fails). ``series_list`` names the series by their workflows; the nodes of a
    combination of orientations are named by the head they belong to.

    With ``total`` (the stages of the run) and a terminal as ``stream``, a tqdm bar under the lines
    counts the stages done and names the running ones with their time so far and, for those that
    write it (``files.stage_progress_writer``), their iterations, redrawn every ``REFRESH_S``: a
    stage runs in a worker process, which cannot draw on the terminal itself. ``close`` ends the bar.
    """

    def __init__(self, series_list, stream=None, clock=time.monotonic, total=None):
        self.workflow_series = {f'series_{series.workflow_name}_wf': series.name for series in series_list}
        for series in series_list:
            head = series_name({key: value for key, value in series.entities.items() if key != 'run'})
            self.workflow_series[f'head_{head.replace("-", "_")}_wf'] = f'{head} (orientations)'
        self.stream = stream or sys.stdout
        self.clock = clock
        self.started = clock()
        self.node_started = {}
        self.node_folder = {}
        self.bar = None
        if total and getattr(self.stream, 'isatty', lambda: False)() and _terminal_width(self.stream) != 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit='stage', file=self.stream, dynamic_ncols=True,
                            bar_format='{n_fmt}/{total_fmt} stages |{bar}| {elapsed}{postfix}')
            self._stop = threading.Event()
            self._refresher = threading.Thread(target=self._refresh, daemon=True)
            self._refresher.start()

    def running(self):
        """The running stages, longest first: ``series stage 12 s``, with ``iteration 40/300`` where
        the stage writes its progress."""
        now = self.clock()
        started = sorted(self.node_started.copy().items(), key=lambda item: item[1])  # copied: two threads
        parts = []
        for fullname, start in started:
            part = f'{self.owner(fullname)} {STAGES[fullname.rsplit(".", 1)[-1]]} {now - start:.0f} s'
            folder = self.node_folder.get(fullname)
            iterations = read_stage_progress(folder) if folder else None
            parts.append(part if iterations is None else f'{part} (iteration {iterations[0]}/{iterations[1]})')
        return ', '.join(parts)

    def _refresh(self):
        while not self._stop.wait(REFRESH_S):
            self.bar.set_postfix_str(self.running())

    def close(self):
        if self.bar is not None:
            self._stop.set()
            self._refresher.join()
            self.bar.close()
            self.bar = None

    def owner(self, fullname):
        for part in fullname.split('.'):
            if part in self.workflow_series:
                return self.workflow_series[part]
        return 'run'

    def __call__(self, node, status):
        stage = STAGES.get(node.name)
        if stage is None:
            return
        now = self.clock()
        if status == 'start':
            self.node_started[node.fullname] = now
            if self.bar is not None:
                self.node_folder[node.fullname] = _output_dir(node)
                self.bar.set_postfix_str(self.running())
            return
        self.node_folder.pop(node.fullname, None)
        seconds = now - self.node_started.pop(node.fullname, now)
        outcome = f'done in {seconds:.1f} s' if status == 'end' else 'FAILED'
        line = f'[{now - self.started:7.1f} s] {self.owner(node.fullname)}: {stage} {outcome}'
        if self.bar is None:
            print(line, file=self.stream, flush=True)
        else:
            self.bar.write(line, file=self.stream)
            self.bar.set_postfix_str(self.running(), refresh=False)
            self.bar.update(1)
