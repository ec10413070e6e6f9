"""The README's SLURM array recipe (scripts/slurm_array.sh) on a real single-node SLURM cluster:
Debian's slurm-wlm and munge, started here as root on their own ports, two participants."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / 'scripts' / 'slurm_array.sh'
DAEMONS = ('munged', 'slurmctld', 'slurmd', 'sbatch')


def _free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def _missing_slurm():
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing or os.geteuid() != 0:
        reason = f'missing {", ".join(missing)}' if missing else 'SLURM daemons start as root'
        if os.environ.get('CI'):
            pytest.fail(f'CI must run the SLURM test ({reason}): .ci/run installs slurm-wlm and munge')
        pytest.skip(f'{reason}; `apt-get install slurm-wlm munge` and run as root')


@pytest.fixture
def slurm_cluster(tmp_path):
    """SLURM_CONF of a one-node cluster (2 CPUs) that lives as long as the test."""
    _missing_slurm()
    folder = tmp_path / 'slurm'
    for name in ('state', 'spool', 'log'):
        (folder / name).mkdir(parents=True)
    key = folder / 'munge.key'
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = folder / 'slurm.conf'
    conf.write_text('\n'.join([
        'ClusterName=qsmpreptest', 'SlurmctldHost=localhost', 'AuthType=auth/munge',
        f'AuthInfo=socket={folder / "munge.socket"}', 'ProctrackType=proctrack/linuxproc', 'TaskPlugin=task/none',
        'SlurmUser=root', f'SlurmctldPidFile={folder / "slurmctld.pid"}', f'SlurmdPidFile={folder / "slurmd.pid"}',
        f'SlurmdSpoolDir={folder / "spool"}', f'StateSaveLocation={folder / "state"}',
        f'SlurmctldLogFile={folder / "log" / "slurmctld.log"}', f'SlurmdLogFile={folder / "log" / "slurmd.log"}',
        f'SlurmctldPort={_free_port()}', f'SlurmdPort={_free_port()}', 'ReturnToService=2',
        'SchedulerType=sched/backfill', 'SelectType=select/cons_tres', 'SelectTypeParameters=CR_Core',
        'JobCompType=jobcomp/none', 'AccountingStorageType=accounting_storage/none', 'MpiDefault=none',
        'NodeName=localhost CPUs=2 RealMemory=8000 State=UNKNOWN',
        'PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP', '']))
    environment = {**os.environ, 'SLURM_CONF': str(conf)}
    started = []
    try:
        subprocess.run(['munged', '--force', f'--key-file={key}', f'--socket={folder / "munge.socket"}',
                        f'--log-file={folder / "log" / "munged.log"}', f'--pid-file={folder / "munged.pid"}',
                        f'--seed-file={folder / "munge.seed"}'], check=True)
        started.append(folder / 'munged.pid')
        subprocess.run(['slurmctld', '-f', str(conf)], check=True, env=environment)
        started.append(folder / 'slurmctld.pid')
        subprocess.run(['slurmd', '-f', str(conf), '-N', 'localhost'], check=True, env=environment)
        started.append(folder / 'slurmd.pid')
        for _ in range(60):
            state = subprocess.run(['sinfo', '-h', '-o', '%T'], capture_output=True, text=True, env=environment)
            if state.stdout.strip() == 'idle':
                break
            time.sleep(0.5)
        else:
            pytest.fail(f'the test cluster did not come up: {state.stdout} {state.stderr}')
        yield environment
    finally:
        for pid_file in reversed(started):
            if pid_file.exists():
                subprocess.run(['kill', pid_file.read_text().strip()], check=False)


def test_the_array_recipe_runs_one_participant_per_task(slurm_cluster, bids_dataset, tmp_path):
    participants = tmp_path / 'participants.txt'
    participants.write_text('01\n02\n')
    output_dir, work_root = tmp_path / 'out', tmp_path / 'scratch'
    environment = {**slurm_cluster, 'QSMPREP': str(Path(sys.executable).with_name('qsmprep')),
                   'QSMPREP_WORK_ROOT': str(work_root)}
    # The recipe's 4 CPUs and 16 GB are for real heads; this node has 2 CPUs and 8 GB.
    result = subprocess.run(['sbatch', '--wait', '--array=1-2', '--cpus-per-task=1', '--mem=2000',
                             f'--output={tmp_path}/task_%a.log', str(RECIPE), str(bids_dataset), str(output_dir),
                             str(participants)], capture_output=True, text=True, env=environment, timeout=600)
    logs = {path.name: path.read_text() for path in tmp_path.glob('task_*.log')}
    assert result.returncode == 0, (result.stderr, logs)
    for task, label in ((1, '01'), (2, '02')):
        log = logs[f'task_{task}.log']
        assert f'array task {task}' in log and f'sub-{label}' in log and '1 of 1 series done' in log, log
        assert (output_dir / f'sub-{label}' / 'anat' / f'sub-{label}_Chimap.nii.gz').is_file()
        assert (output_dir / f'sub-{label}.html').is_file()
        assert (work_root / f'sub-{label}' / 'qsmprep_wf').is_dir()
