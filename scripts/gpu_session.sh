#!/usr/bin/env bash
# One lent-GPU session for LP-CNN: resume the shipped checkpoint on the GPU for MINUTES minutes,
# then time inference on 160^3 on that GPU and check it against the CPU. Everything it makes
# lands in $OUT (the device tool returns that folder): model/ holds checkpoint.pt, model.pt,
# model_card.json and training_log.jsonl to copy into qsmprep/learned/models/lpcnn/ once
# tests/test_lpcnn.py and benchmarks/inversion_benchmark.py have been rerun here with them.
#
# The GPU machine has python3 with torch, numpy and scipy but no nibabel or nilearn (the
# brain-like phantoms need nilearn's MNI maps) and no network, so their wheels travel in .whl/:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       nibabel==5.4.2 nilearn==0.14.1
#
# and the device tool runs, with carry [".whl"] and a timeout of MINUTES + 3 minutes:
#
#   bash scripts/gpu_session.sh MINUTES [--patch-size 128 --batch-size 2 --learning-rate 1e-4 ...]
#
# Arguments after MINUTES go to qsmprep-train (its schedule: patch size, batch size, learning rate).
# Large patches are what a GPU is for: the shipped model, trained on the CPU on 32^3 and 64^3
# patches (a 96^3 step of batch 1 takes 35 s there in float32, 8 s in bfloat16), adds much less
# to its starting estimate on 96^3 patches than on 64^3 ones and next to nothing on whole brains
# (benchmarks/SIMULATED_BRAINS.md), so --patch-size 128 (a 1.5 mm brain fits) with
# --batch-size 2 is the first thing to try. CPU fine-tunes have stopped helping. The mean NRMSE of
# simulate_head seeds 0-2 x fractions 0, 0.5, 1 at 1.5 mm went from 48.6 to 48.9 % after 419
# steps on one 96^3 patch each. After 743 steps on two 64^3 patches each (lr 3e-5) it went to
# 48.0 %, but the brains without disturbance went from 30.4 to 31.0 %.
# One core simulates a 96^3 batch of 4 in about 9 s, so qsmprep-train's default of one simulation
# worker per CPU core but one (15 there) is what keeps the GPU busy.
#
# MODEL=lpn resumes the shipped LPN (qsmprep/learned/models/lpn/; a denoiser of patches, so
# --patch-size 64 --batch-size 8 or larger) and times its proximal gradient descent on 160^3.
#
# MODEL=deepsti resumes the shipped DeepSTI instead (qsmprep/learned/models/deepsti/; large patches,
# e.g. --patch-size 64 --batch-size 4, are again the first thing to try) and times it on 160^3 with
# 6 orientations.
set -euo pipefail
minutes=${1:?usage: [MODEL=lpcnn|lpn|deepsti] bash scripts/gpu_session.sh MINUTES [qsmprep-train arguments]}
shift
out=${OUT:?OUT must name the folder to leave the results in}
model=${MODEL:-lpcnn}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

mkdir -p "$out/model"
cp "qsmprep/learned/models/$model/checkpoint.pt" "qsmprep/learned/models/$model/training_log.jsonl" "$out/model/"
# SIGTERM at the time limit ends training after the current step with checkpoint and card written.
timeout --signal=TERM "${minutes}m" python3 -m qsmprep.cli.train "$model" --out "$out/model" \
    --resume "$out/model/checkpoint.pt" --steps 10000000 --device cuda --checkpoint-every 200 --log-every 20 \
    "$@" || [ $? -eq 124 ]

python3 - "$out/model" <<'EOF' | tee "$out/gpu_timing.txt"
"""Seconds of LP-CNN, LPN or DeepSTI inference on a 160^3 box on the GPU, and its agreement with the CPU."""
import functools
import sys
import time

import numpy as np
import torch

from qsmprep.learned import lpcnn
from qsmprep.learned.deepsti import DeepSTI, deepsti_invert
from qsmprep.learned.lpn import LPN, lpn_invert
from qsmprep.learned.models import load_model, read_card
from qsmprep.science.physics import DipoleOperator

model = load_model(sys.argv[1])
shape, voxel_size = (160, 160, 160), (1.0, 1.0, 1.0)
tilts = np.radians([0, 25, -25, 25, -25, 20])
b0_dirs = np.array([[np.sin(t), 0, np.cos(t)] if i in (1, 2) else [0, np.sin(t), np.cos(t)]
                    for i, t in enumerate(tilts)])
grid = np.indices(shape).astype(np.float32) - 79.5
mask = (grid ** 2).sum(axis=0) < 70 ** 2
chi = np.where(mask, 0.05 * np.sin(grid[0] / 7) * np.cos(grid[1] / 11), 0).astype(np.float32)
field = np.where(mask, DipoleOperator(shape, voxel_size, b0_dirs[0], pad_factor=1.5).forward(chi), 0)
if isinstance(model, LPN):
    card = read_card(sys.argv[1])[0]['inference']
    name, cpu_options = f'LPN ({card["iterations"]} proximal gradient iterations)', {}
    invert = functools.partial(lpn_invert, field, mask, voxel_size, b0_dirs[0], model, card['step_size'],
                               card['iterations'])
elif isinstance(model, DeepSTI):
    name, cpu_options = 'DeepSTI (6 orientations)', {}
    fields = [np.where(mask, DipoleOperator(shape, voxel_size, b0_dir, pad_factor=1.5).forward(chi), 0)
              for b0_dir in b0_dirs]
    invert = functools.partial(deepsti_invert, fields, mask, voxel_size, b0_dirs, model)
else:
    # float32 on the CPU too: on a CPU with bfloat16 instructions 'auto' would measure bfloat16's error.
    name, cpu_options = 'LP-CNN', {'precision': 'float32'}
    invert = functools.partial(lpcnn.lpcnn_invert, field, mask, voxel_size, b0_dirs[0], model)

invert(device='cuda')  # warm-up
seconds = []
for _ in range(3):
    torch.cuda.synchronize()
    start = time.perf_counter()
    on_gpu = invert(device='cuda')
    torch.cuda.synchronize()
    seconds.append(time.perf_counter() - start)
on_cpu = invert(device='cpu', **cpu_options)
difference = np.abs(on_gpu - on_cpu).max() / np.abs(on_cpu).max()
print(f'{torch.cuda.get_device_name()}: {name} on 160^3 in {min(seconds):.2f} s (best of 3 after a warm-up), '
      f'peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB; '
      f'largest GPU-CPU difference {difference:.1e} of the largest value')
EOF
