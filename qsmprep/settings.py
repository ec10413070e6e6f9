"""The settings of one run of the BIDS App, in one frozen object.

The command line builds ``Settings`` (``cli.run``), the workflows take what they need from it,
and it is saved as TOML to the derivatives' ``logs/`` so that a run can be audited or repeated.
"""
import dataclasses
import json
from pathlib import Path
from typing import Optional

from . import __version__
from .methods import DEFAULT_INVERSION
from .science.unwrap import DEFAULT_UNWRAP


@dataclasses.dataclass(frozen=True)
class Settings:
    bids_dir: Path
    output_dir: Path
    work_dir: Path
    analysis_level: str = 'participant'
    participant_label: Optional[tuple] = None  # labels as given (None: every participant)
    session_label: Optional[tuple] = None
    skip_bids_validation: bool = False
    field_strength: Optional[float] = None  # tesla, overriding MagneticFieldStrength
    phase_sign: int = 1
    mask: Optional[Path] = None  # the user's brain mask
    unwrap: str = DEFAULT_UNWRAP
    bgremove: str = 'vsharp'
    inversion: str = DEFAULT_INVERSION
    masking: str = 'two-pass'
    chi_separation: bool = True
    multi_orientation: bool = False  # the runs of one head are its orientations: register, COSMOS
    sti: Optional[str] = None  # a methods.STI_METHODS name: the tensor maps, also below 6 orientations
    nprocs: int = 1
    omp_nthreads: int = 1  # resolved: threads of one process
    resource_monitor: bool = False
    verbose: int = 0
    template: str = 'MNI152NLin2009cAsym'  # the group level's TemplateFlow template
    atlas: str = 'MASSP20'  # and its atlas of deep grey matter

    @classmethod
    def from_arguments(cls, arguments):
        """From the parsed command line; ``--omp-nthreads`` defaults to ``--nprocs``."""
        values = {f.name: getattr(arguments, f.name) for f in dataclasses.fields(cls)}
        values['omp_nthreads'] = arguments.omp_nthreads or arguments.nprocs
        for key in ('participant_label', 'session_label'):
            if values[key] is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def to_toml(self):
        """Flat TOML: the version, then every setting that has a value."""
        lines = ['[qsmprep]', f'version = {_toml_value(__version__)}']
        lines += [f'{key} = {_toml_value(value)}' for key, value in sorted(dataclasses.asdict(self).items())
                  if value is not None]
        return '\n'.join(lines) + '\n'


def _toml_value(value):
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return '[' + ', '.join(_toml_value(v) for v in value) + ']'
    return json.dumps(str(value))
