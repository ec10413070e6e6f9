"""Trained models: where qsmprep ships them, how a model card's weights are checked and loaded.

A model folder holds ``model.pt`` (the weights), ``model_card.json`` (how they were made: see
``train``, ``train_lpn`` and ``train_deepsti``) and ``checkpoint.pt`` (what ``qsmprep-train
--resume`` continues from). The LP-CNN, LPN and DeepSTI that qsmprep uses are the folders of
``SHIPPED``, inside the package, so nothing is downloaded at run time.
"""
import functools
import hashlib
import json
from pathlib import Path

import torch

from . import SHIPPED_DEEPSTI_CARD, SHIPPED_INVERSION_CARDS
from .deepsti import DeepSTI, deepsti_invert
from .lpcnn import LPCNN, NETWORK_UNITS_PER_PPM, lpcnn_invert
from .lpn import LPN, lpn_invert
from .qsmnet import QSMnet

CHECKPOINT_NAME, WEIGHTS_NAME, CARD_NAME = 'checkpoint.pt', 'model.pt', SHIPPED_DEEPSTI_CARD.name
SHIPPED = {**{name: card.parent for name, card in SHIPPED_INVERSION_CARDS.items()},
           'deepsti': SHIPPED_DEEPSTI_CARD.parent}
ARCHITECTURES = {'lpcnn': LPCNN, 'lpn': LPN, 'deepsti': DeepSTI, 'qsmnet': QSMnet}
MODEL_NAMES = {'lpcnn': 'LP-CNN', 'lpn': 'LPN', 'deepsti': 'DeepSTI', 'qsmnet': 'QSMnet'}


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as stream:
        for block in iter(lambda: stream.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def read_card(path):
    """The model card of ``path`` (the card itself or its folder) and the card's path."""
    card_path = Path(path)
    if card_path.is_dir():
        card_path = card_path / CARD_NAME
    return json.loads(card_path.read_text()), card_path


def load_model(path):
    """The model (LP-CNN, LPN or DeepSTI) of a model card (its path or its folder), in eval mode on the CPU.

    The weights file must have the sha256 that the card records: a model is only used as it
    was trained and described.
    """
    card, card_path = read_card(path)
    weights_path = card_path.parent / card['weights']['file']
    actual = sha256_of(weights_path)
    if actual != card['weights']['sha256']:
        raise ValueError(f'{weights_path}: sha256 {actual} differs from {card["weights"]["sha256"]} in {card_path}; '
                         'the weights were changed or damaged, copy them again together with their card')
    if card['network_units_per_ppm'] != NETWORK_UNITS_PER_PPM:
        raise ValueError(f'{card_path}: the model works in {card["network_units_per_ppm"]} units per ppm, this '
                         f'qsmprep in {NETWORK_UNITS_PER_PPM}; use the qsmprep version that trained it')
    model = ARCHITECTURES[card['model']](**card['architecture'])
    model.load_state_dict(torch.load(weights_path, map_location='cpu', weights_only=True))
    return model.eval()


@functools.lru_cache(maxsize=None)
def shipped_model(name):
    """The model shipped with qsmprep for the learned inversion ``name`` ('lpcnn' or 'lpn') or for
    'deepsti', checked against its card."""
    return load_model(SHIPPED[name])


def shipped_description(name):
    """Sidecar keys naming the shipped model ``name``: its card's training summary and weights' sha256."""
    card, _ = read_card(SHIPPED[name])
    description = {'Model': MODEL_NAMES[name], 'ModelTrainingSteps': card['steps'],
                   'ModelSha256': card['weights']['sha256'], 'ModelGeneratorVersion': card['generator']['version']}
    if 'chosen_step' in card['validation']:
        description['ModelChosenStep'] = card['validation']['chosen_step']
    return description


def invert_with_shipped(name, local_fields_ppm, mask, voxel_size, b0_dirs, device=None, progress=None):
    """Susceptibility (ppm) from one or more orientations' local fields by the shipped model of the
    learned inversion ``name`` (see ``lpcnn.lpcnn_invert`` for the arguments), and the sidecar keys
    that name the model; LPN's also give the iterations and step its card holds, and hear
    ``progress(done, total)`` of its iterations."""
    description = shipped_description(name)
    if name == 'lpcnn':
        chi = lpcnn_invert(local_fields_ppm, mask, voxel_size, b0_dirs, shipped_model(name), device=device)
        return chi, description
    inference = read_card(SHIPPED[name])[0]['inference']
    chi = lpn_invert(local_fields_ppm, mask, voxel_size, b0_dirs, shipped_model(name), inference['step_size'],
                     inference['iterations'], device=device, progress=progress)
    return chi, {**description, 'ProximalGradientIterations': inference['iterations'],
                 'ProximalGradientStepSize': inference['step_size']}


def tensor_with_shipped_deepsti(local_fields_ppm, mask, voxel_size, b0_dirs, device=None):
    """The susceptibility tensor (6, *shape) by the shipped DeepSTI from one or more orientations
    (see ``deepsti.deepsti_invert``), and the sidecar keys that name the model."""
    tensor = deepsti_invert(local_fields_ppm, mask, voxel_size, b0_dirs, shipped_model('deepsti'), device=device)
    return tensor, shipped_description('deepsti')
