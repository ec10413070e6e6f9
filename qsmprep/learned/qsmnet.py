"""A QSMnet-style U-Net (Yoon et al., NeuroImage 2018): direct inversion without the physics in the loop.

The baseline that measures what LP-CNN and LPN gain by keeping the dipole operator inside the
network: the U-Net maps one orientation's local field straight to susceptibility. QSMnet turned
every field so that B0 lies along the third axis; interpolating the field and the truth would
blur both, so this network instead reads the B0 direction (voxel axes) as three constant input
channels beside the field and the mask. It is trained on LP-CNN's simulated patches
(``train_qsmnet``) with QSMnet's loss terms: L1 to the truth plus the L1 misfit of its field
(the model loss), and works in ``lpcnn.NETWORK_UNITS_PER_PPM`` units.
"""
import numpy as np
import torch
from torch import nn

from .lpcnn import NETWORK_UNITS_PER_PPM, checked_fields, default_device, network_inputs

# Two poolings: the network needs each edge to be a multiple of 4.
EDGE_MULTIPLE = 4


def _convolutions(in_channels, out_channels):
    # Batch normalisation as in QSMnet: without it the U-Net barely left its zero output in 200
    # steps (head NRMSE 99.7 %, 95.1 % with it after 300; benchmarks/NOTES.md).
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, padding=1), nn.BatchNorm3d(out_channels),
                         nn.ReLU(inplace=True),
                         nn.Conv3d(out_channels, out_channels, 3, padding=1), nn.BatchNorm3d(out_channels),
                         nn.ReLU(inplace=True))


class QSMnet(nn.Module):
    """U-Net of three levels (``channels``, 2x and 4x as many; two 3x3x3 convolutions with batch
    normalisation and ReLU each) with max pooling, transposed convolutions and skip connections.
    ``forward(field, mask, b0_dirs)`` takes the field and mask
    (B, 1, X, Y, Z), edges multiples of ``EDGE_MULTIPLE``, in network units and the B0 directions
    (B, 3), and returns susceptibility (B, 1, X, Y, Z) in network units, 0 outside the mask."""

    def __init__(self, channels=16):
        super().__init__()
        self.config = {'channels': channels}
        self.encode = nn.ModuleList([_convolutions(5, channels), _convolutions(channels, 2 * channels)])
        self.bottom = _convolutions(2 * channels, 4 * channels)
        self.upsample = nn.ModuleList([nn.ConvTranspose3d(4 * channels, 2 * channels, 2, stride=2),
                                       nn.ConvTranspose3d(2 * channels, channels, 2, stride=2)])
        self.decode = nn.ModuleList([_convolutions(4 * channels, 2 * channels), _convolutions(2 * channels, channels)])
        self.output = nn.Conv3d(channels, 1, 1)

    def forward(self, field, mask, b0_dirs):
        directions = b0_dirs.to(field.dtype)[:, :, None, None, None].expand(-1, -1, *field.shape[2:])
        features = torch.cat([field * mask, mask, directions], dim=1)
        skips = []
        for encode in self.encode:
            features = encode(features)
            skips.append(features)
            features = nn.functional.max_pool3d(features, 2)
        features = self.bottom(features)
        for upsample, decode, skip in zip(self.upsample, self.decode, reversed(skips)):
            features = decode(torch.cat([upsample(features), skip], dim=1))
        return self.output(features) * mask


def padded_to_multiple(volume, multiple=EDGE_MULTIPLE):
    """``volume`` (B, C, X, Y, Z) zero-padded at the far end of each edge to a multiple of ``multiple``."""
    padding = []
    for size in reversed(volume.shape[2:]):
        padding += [0, -size % multiple]
    return nn.functional.pad(volume, padding)


def qsmnet_invert(local_fields_ppm, mask, voxel_size, b0_dirs, model, device=None):
    """Susceptibility (ppm) by ``model`` from local fields as ``lpcnn.lpcnn_invert`` takes them:
    QSMnet reads one orientation, so with several the result is the mean of each one's map."""
    fields, mask, b0_dirs = checked_fields(local_fields_ppm, mask, b0_dirs)
    chi = np.zeros(mask.shape, dtype=np.float32)
    if not mask.any():
        return chi
    device = torch.device(device) if device is not None else default_device()
    box, fields_in, mask_in = network_inputs(fields, mask, voxel_size, device)
    shape = mask_in.shape[2:]
    model = model.to(device).eval()
    estimates = []
    with torch.no_grad():
        for orientation, b0_dir in enumerate(b0_dirs):
            direction = torch.tensor(b0_dir, dtype=torch.float32, device=device)[None]
            estimate = model(padded_to_multiple(fields_in[:, orientation:orientation + 1]),
                             padded_to_multiple(mask_in), direction)
            estimates.append(estimate[0, 0, :shape[0], :shape[1], :shape[2]])
    chi[box] = (torch.stack(estimates).mean(dim=0) * mask_in[0, 0]).cpu().numpy() / NETWORK_UNITS_PER_PPM
    return np.where(mask, chi, 0).astype(np.float32)
