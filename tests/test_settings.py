from pathlib import Path

import pytest

from qsmprep.cli.parser import build_parser
from qsmprep.settings import Settings


def test_settings_come_from_the_command_line_and_cannot_change(tmp_path):
    arguments = build_parser().parse_args([str(tmp_path), str(tmp_path / 'out'), 'participant', '--nprocs', '4',
                                           '--participant-label', '01', '02', '--inversion', 'l2'])
    settings = Settings.from_arguments(arguments)
    assert settings.omp_nthreads == 4 and settings.participant_label == ('01', '02')
    assert settings.inversion == 'l2' and settings.output_dir == Path(tmp_path / 'out').absolute()
    with pytest.raises(AttributeError):
        settings.inversion = 'tv'
    toml = settings.to_toml()
    assert 'inversion = "l2"' in toml and 'participant_label = ["01", "02"]' in toml
    assert 'mask =' not in toml  # unset settings are left out
