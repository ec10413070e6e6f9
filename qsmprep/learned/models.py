"""Trained models: where qsmprep ships them, how a model card's weights are checked and loaded.

A model folder holds ``model.pt`` (the weights), ``model_card.json`` (how they were made: see
``train`` and ``train_deepsti``) and ``checkpoint.pt`` (what ``qsmprep-train --resume`` continues
from). The LP-CNN and DeepSTI that qsmprep uses are ``SHIPPED_LPCNN`` and ``SHIPPED_DEEPSTI``,
inside the package, so nothing is downloaded at run time.
"""
import functools
import hashlib
import json
from pathlib import Path

import torch

from . import SHIPPED_DEEPSTI_CARD, SHIPPED_LPCNN_CARD
from .deepsti import DeepSTI, deepsti_invert
from .lpcnn import LPCNN, NETWORK_UNITS_PER_PPM, lpcnn_invert

CHECKPOINT_NAME, WEIGHTS_NAME, CARD_NAME = 'checkpoint.pt', 'model.pt', SHIPPED_LPCNN_CARD.name
SHIPPED_LPCNN, SHIPPED_DEEPSTI = SHIPPED_LPCNN_CARD.parent, SHIPPED_DEEPSTI_CARD.parent
ARCHITECTURES = {'lpcnn': LPCNN, 'deepsti': DeepSTI}


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
    """The model (LP-CNN or DeepSTI) of a model card (its path or its folder), in eval mode on the CPU.

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


@functools.lru_cache(maxsize=1)
def shipped_lpcnn():
    """The LP-CNN shipped with qsmprep, checked against its card."""
    return load_model(SHIPPED_LPCNN)


def shipped_lpcnn_description():
    """Sidecar keys naming the shipped model: its card's training summary and weights' sha256."""
    card, _ = read_card(SHIPPED_LPCNN)
    return {'Model': 'LP-CNN', 'ModelTrainingSteps': card['steps'],
            'ModelSha256': card['weights']['sha256'], 'ModelGeneratorVersion': card['generator']['version']}


def invert_with_shipped_lpcnn(local_fields_ppm, mask, voxel_size, b0_dirs, device=None):
    """Susceptibility (ppm) from one or more orientations' local fields by the shipped LP-CNN,
    and the sidecar keys that name the model (see ``lpcnn.lpcnn_invert`` for the arguments)."""
    chi = lpcnn_invert(local_fields_ppm, mask, voxel_size, b0_dirs, shipped_lpcnn(), device=device)
    return chi, shipped_lpcnn_description()


@functools.lru_cache(maxsize=1)
def shipped_deepsti():
    """The DeepSTI shipped with qsmprep, checked against its card."""
    return load_model(SHIPPED_DEEPSTI)


def tensor_with_shipped_deepsti(local_fields_ppm, mask, voxel_size, b0_dirs, device=None):
    """The susceptibility tensor (6, *shape) by the shipped DeepSTI from one or more orientations
    (see ``deepsti.deepsti_invert``), and the sidecar keys that name the model."""
    tensor = deepsti_invert(local_fields_ppm, mask, voxel_size, b0_dirs, shipped_deepsti(), device=device)
    card, _ = read_card(SHIPPED_DEEPSTI)
    return tensor, {'Model': 'DeepSTI', 'ModelTrainingSteps': card['steps'],
                    'ModelChosenStep': card['validation']['chosen_step'], 'ModelSha256': card['weights']['sha256'],
                    'ModelGeneratorVersion': card['generator']['version']}
