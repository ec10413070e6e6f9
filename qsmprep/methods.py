"""Every dipole inversion qsmprep offers, registered once with its name, sidecar entries and citation.

The BIDS App's ``--inversion`` and ``qsmprep-tools invert --method`` take their choices from
``INVERSIONS``, the Chimap sidecar its ``EstimationAlgorithm`` and fixed parameters, and the
README its table of methods (``markdown_table``; a test keeps the README in step). ``invert``
runs any of them: the classical ones through ``science.inversion.invert``, the learned ones
through ``learned.models`` (imported only then, so that the classical pipeline needs no torch).
"""
from dataclasses import dataclass, field

from .science import inversion, orientations
from .science.physics import TENSOR_COMPONENTS


@dataclass(frozen=True)
class InversionMethod:
    name: str
    summary: str  # a line for users: README and help
    estimation_algorithm: str  # the Chimap sidecar's EstimationAlgorithm
    citation: str
    sidecar_parameters: dict = field(default_factory=dict)  # fixed entries; chosen values are added per run
    learned: bool = False  # needs torch; takes one or several orientations
    model_name: str = ''  # a learned method's shipped model, as users read it


_WEIGHT_RULE = {'RegularizationWeightRule': f'{inversion.TV_TO_L2_WEIGHT} x the GCV weight of closed-form L2, '
                                            'relative to the local field scaled to unit RMS in the mask'}
_FANSI = ('Milovic C, Bilgic B, Zhao B, Acosta-Cabronero J, Tejos C. Fast nonlinear susceptibility inversion '
          'with variational regularization. Magn Reson Med 2018;80:814-821.')

INVERSIONS = {method.name: method for method in (
    InversionMethod(
        'tv', 'magnitude-weighted total variation (the default)',
        'magnitude-weighted total variation, ADMM (linear FANSI form)', _FANSI,
        {**_WEIGHT_RULE, 'MaxIterations': inversion.TV_ITERATIONS}),
    InversionMethod(
        'nltv', 'total variation with a nonlinear (complex exponential) data term',
        'magnitude-weighted total variation with a nonlinear (complex exponential) data term, ADMM', _FANSI,
        {**_WEIGHT_RULE, 'MaxIterations': inversion.TV_ITERATIONS,
         'DataTermPhase': 'field as phase at the mean echo time'}),
    InversionMethod(
        'l2', 'closed-form L2 with a gradient penalty, weight by generalised cross-validation',
        'closed-form L2 with a gradient penalty',
        'Bilgic B, Chatnuntawech I, Fan AP, et al. Fast image reconstruction with L2-regularization. J Magn '
        'Reson Imaging 2014;40:181-191.',
        {'RegularizationWeightRule': 'generalised cross-validation, relative to the local field scaled to unit '
                                     'RMS in the mask'}),
    InversionMethod(
        'tkd', 'truncated k-space division', 'truncated k-space division',
        'Shmueli K, de Zwart JA, van Gelderen P, et al. Magnetic susceptibility mapping of brain tissue in vivo '
        'using MRI phase data. Magn Reson Med 2009;62:1510-1522.',
        {'Threshold': inversion.TKD_THRESHOLD}),
    # The model's name, training steps and sha256 are added per series when it runs.
    InversionMethod(
        'lpcnn', 'the learned LP-CNN shipped with qsmprep; needs torch, on the GPU when torch sees one',
        'learned proximal gradient descent (LP-CNN, Lai et al. 2020), trained by qsmprep-train on simulated data; '
        'model card inside the package',
        'Lai KW, Aggarwal M, van Zijl P, Li X, Sulam J. Learned proximal networks for quantitative '
        'susceptibility mapping. MICCAI 2020, LNCS 12262:125-135.',
        learned=True, model_name='LP-CNN'),
    InversionMethod(
        'lpn', 'proximal gradient descent with the learned proximal network (LPN) shipped with qsmprep, whose '
               'regularizer can be evaluated; needs torch',
        'proximal gradient descent with a learned proximal network (LPN, Fang et al. 2024), a denoiser trained by '
        'qsmprep-train on simulated susceptibility; model card inside the package',
        'Fang Z, Buchanan S, Sulam J. What\'s in a prior? Learned proximal networks for inverse problems. ICLR 2024.',
        learned=True, model_name='LPN'),
)}
DEFAULT_INVERSION = inversion.DEFAULT_INVERSION
LEARNED_INVERSIONS = tuple(name for name, method in INVERSIONS.items() if method.learned)


def markdown_table():
    """The README's table of inversion methods."""
    lines = ['| `--inversion` | method | reference |', '|---|---|---|']
    lines += [f'| `{m.name}` | {m.summary} | {m.citation} |' for m in INVERSIONS.values()]
    return '\n'.join(lines)


def invert(method, local_fields_ppm, mask, voxel_size, b0_dirs, magnitude=None, echo_times=None,
           field_strength=None, threads=1, progress=None):
    """Susceptibility (ppm, referenced to its mean over ``mask``) by the registered ``method``, and
    the parameters it chose (for the sidecar).

    ``local_fields_ppm`` and ``b0_dirs`` (voxel axes): one per head orientation; the classical
    methods take one. ``magnitude``: the data weight of the classical methods. ``echo_times`` (s)
    and ``field_strength`` (T): needed by ``nltv``, whose data term is the field as phase.
    ``threads``: torch's threads for a learned method (the FFTs take scipy's workers).
    ``progress(done, total)``: told of the iterations of the iterative methods.
    """
    if INVERSIONS[method].learned:
        import torch

        from .learned.models import invert_with_shipped
        torch.set_num_threads(max(1, threads))
        chi, parameters = invert_with_shipped(method, list(local_fields_ppm), mask, voxel_size, list(b0_dirs),
                                              progress=progress)
    else:
        if len(local_fields_ppm) != 1:
            raise ValueError(f'{method} inverts one local field; several orientations need '
                             f'{" or ".join(LEARNED_INVERSIONS)}')
        options = {}
        if method == 'nltv':
            if echo_times is None or field_strength is None:
                raise ValueError('nltv needs the echo times and the field strength (its data term is phase)')
            options['phase_scale_rad_per_ppm'] = inversion.phase_scale_rad_per_ppm(echo_times, field_strength)
        chi, parameters = inversion.invert(local_fields_ppm[0], mask, voxel_size, b0_dirs[0], method=method,
                                           magnitude=magnitude, progress=progress, **options)
    return inversion.reference_to_mask_mean(chi, mask), parameters


@dataclass(frozen=True)
class TensorMethod:
    name: str
    summary: str  # for users: help and README
    estimation_algorithm: str  # the tensor maps' sidecar EstimationAlgorithm
    citation: str
    learned: bool = False


STI_METHODS = {method.name: method for method in (
    TensorMethod(
        'ls', 'least squares over the tensor model; 6 or more orientations determine the tensor',
        'least squares over the tensor model, conjugate gradients stopped early',
        'Liu C. Susceptibility tensor imaging. Magn Reson Med 2010;63:1471-1477.'),
    TensorMethod(
        'deepsti', 'the learned DeepSTI shipped with qsmprep, from 1 to 6+ orientations; needs torch',
        'learned proximal gradient descent on the tensor model (DeepSTI, Fang et al. 2023), trained by '
        'qsmprep-train on simulated tensor phantoms; model card inside the package',
        'Fang Z, Lai KW, van Zijl P, Li X, Sulam J. DeepSTI: Towards tensor reconstruction using fewer orientations '
        'in susceptibility tensor imaging. Med Image Anal 2023;87:102829.', learned=True),
)}


def susceptibility_tensor(method, local_fields_ppm, mask, voxel_size, b0_dirs, threads=1,
                          iterations=orientations.STI_ITERATIONS):
    """The susceptibility tensor (6, *shape) in ppm (``physics.TENSOR_COMPONENTS``, voxel axes, 0
    outside ``mask``) by the registered STI ``method`` from the local fields (N, *shape) of N
    orientations with their B0 directions (voxel axes), and its sidecar entries. ``iterations``:
    of least squares' conjugate gradients."""
    parameters = {'EstimationAlgorithm': STI_METHODS[method].estimation_algorithm,
                  'Orientations': len(local_fields_ppm),
                  'TensorComponents': [f'chi{i + 1}{j + 1}' for i, j in TENSOR_COMPONENTS]}
    if STI_METHODS[method].learned:
        import torch

        from .learned.models import tensor_with_shipped_deepsti
        torch.set_num_threads(max(1, threads))
        tensor, model = tensor_with_shipped_deepsti(list(local_fields_ppm), mask, voxel_size, list(b0_dirs))
        return tensor, {**parameters, **model}
    tensor = orientations.sti_least_squares(local_fields_ppm, mask, voxel_size, b0_dirs, iterations=iterations)
    return tensor, {**parameters, 'Iterations': iterations}
