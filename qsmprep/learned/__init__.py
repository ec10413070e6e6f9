"""Learned dipole inversion (needs torch): LP-CNN, LPN and DeepSTI, their training-data simulator
and their training command.

- ``lpcnn``: the dipole operator in torch, the proximal CNN, the unrolled LP-CNN and ``lpcnn_invert``.
- ``lpn``: the learned proximal network, its regularizer and ``lpn_invert``.
- ``deepsti``: the tensor dipole operator in torch, DeepSTI and ``deepsti_invert``.
- ``phantoms`` and ``simulate``: seeded, versioned training samples simulated on the fly.
- ``train``, ``train_lpn`` and ``train_deepsti``: ``qsmprep-train lpcnn``, ``lpn`` and ``deepsti``,
  checkpoints and model cards.
- ``models``: the shipped models, their cards and ``load_model``.

Nothing here but this module is imported by the rest of qsmprep before a learned method is
chosen, so the classical pipeline runs without torch.
"""
import importlib.util
import json
from pathlib import Path

SHIPPED_LPCNN_CARD = Path(__file__).parent / 'models' / 'lpcnn' / 'model_card.json'
SHIPPED_LPN_CARD = Path(__file__).parent / 'models' / 'lpn' / 'model_card.json'
SHIPPED_DEEPSTI_CARD = Path(__file__).parent / 'models' / 'deepsti' / 'model_card.json'
SHIPPED_INVERSION_CARDS = {'lpcnn': SHIPPED_LPCNN_CARD, 'lpn': SHIPPED_LPN_CARD}


def shipped_voxel_size_range_mm(method):
    """The (smallest, largest) voxel size in mm that the shipped model of the learned inversion
    ``method`` was trained on."""
    card = json.loads(SHIPPED_INVERSION_CARDS[method].read_text())
    return tuple(card['generator']['config']['voxel_size_range_mm'])


def missing_torch_message(option):
    """Why ``option`` (such as '--inversion lpcnn') cannot run here, or None when torch is installed."""
    if importlib.util.find_spec('torch') is not None:
        return None
    return (f'{option} needs PyTorch, which is not installed; install qsmprep with its learned '
            f'extra (pip install torch==2.13.0 "qsmprep[learned]"), use the qsmprep container image, or '
            f'choose a classical method')
