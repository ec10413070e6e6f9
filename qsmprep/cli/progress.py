"""One terminal line per finished stage of a run, from Nipype's status callback."""
import sys
import time

from ..bids import series_name

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


class StageProgress:
    """Nipype's ``status_callback``: prints ``[elapsed] series: stage done in s`` when a stage ends
    (or failed when it fails). ``series_list`` names the series by their workflows; the nodes of a
    combination of orientations are named by the head they belong to."""

    def __init__(self, series_list, stream=None, clock=time.monotonic):
        self.workflow_series = {f'series_{series.workflow_name}_wf': series.name for series in series_list}
        for series in series_list:
            head = series_name({key: value for key, value in series.entities.items() if key != 'run'})
            self.workflow_series[f'head_{head.replace("-", "_")}_wf'] = f'{head} (orientations)'
        self.stream = stream or sys.stdout
        self.clock = clock
        self.started = clock()
        self.node_started = {}

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
            return
        seconds = now - self.node_started.pop(node.fullname, now)
        outcome = f'done in {seconds:.1f} s' if status == 'end' else 'FAILED'
        print(f'[{now - self.started:7.1f} s] {self.owner(node.fullname)}: {stage} {outcome}', file=self.stream,
              flush=True)
