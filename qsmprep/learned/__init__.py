"""Learned dipole inversion (needs torch): LP-CNN, its training-data simulator and its training command.

- ``lpcnn``: the dipole operator in torch, the proximal CNN, the unrolled LP-CNN and ``lpcnn_invert``.
- ``phantoms`` and ``simulate``: seeded, versioned training samples simulated on the fly.
- ``train``: ``qsmprep-train lpcnn``, its checkpoints and model card, and ``load_model``.

Nothing here is imported by the rest of qsmprep, so the classical pipeline runs without torch.
"""
