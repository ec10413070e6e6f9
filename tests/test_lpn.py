"""LPN: a gradient of a convex function, exactly the proximal operator of the regularizer it reports,
its training command, and the shipped model inside the dipole inversion.

Tiny sizes (12^3 volumes, 4 channels) keep the checks of the network within seconds on one thread.
"""
import json

import numpy as np
import pytest
import torch

from qsmprep.cli.train import main
from qsmprep.learned import lpn, simulate
from qsmprep.learned.lpcnn import apply_in_tiles
from qsmprep.science import inversion, metrics

SHAPE = (1, 1, 12, 11, 10)
TINY_TRAINING = ['--patch-size', '16', '--batch-size', '2', '--channels', '4', '--layers', '2', '--log-every', '1',
                 '--l1-steps', '4', '--gamma-steps', '4', '--validation-heads', '1',
                 '--validation-head-voxel-size', '4', '--validation-step-sizes', '1', '--validation-iterations', '2',
                 '--workers', '0']


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def _random_lpn(seed=0, channels=4, layers=3):
    """A tiny LPN whose every weight is random, the constrained ones drawn negative as often as
    not: the forward pass must still be convex."""
    torch.manual_seed(seed)
    model = lpn.LPN(channels, layers, initial_quadratic_weight=0.05)
    with torch.no_grad():
        for parameter in model.potential.parameters():
            parameter.normal_(std=0.3)
    return model.double()


def test_the_potential_is_convex_along_random_lines_even_with_negative_weights_stored():
    model = _random_lpn()
    generator = torch.Generator().manual_seed(1)
    steps = torch.linspace(-1, 2, 31, dtype=torch.float64)
    for _ in range(5):
        start, direction = torch.randn((2,) + SHAPE, generator=generator, dtype=torch.float64)
        values = torch.stack([model.potential(start + t * direction) for t in steps]).squeeze()
        second_differences = values[:-2] - 2 * values[1:-1] + values[2:]
        assert second_differences.min() > -1e-9 * values.abs().max()


def test_stored_negative_weights_act_as_zero_and_projection_clamps_them():
    model = _random_lpn()
    assert any((conv.weight < 0).any() for conv in model.potential.hidden_convs)
    y = torch.randn(SHAPE, dtype=torch.float64)
    before = model.potential(y)
    model.potential.project()
    assert all((conv.weight >= 0).all() for conv in model.potential.hidden_convs)
    assert (model.potential.output_weights >= 0).all()
    assert torch.allclose(model.potential(y), before)


def test_the_network_is_the_gradient_of_its_potential_and_is_monotone():
    model = _random_lpn()
    generator = torch.Generator().manual_seed(2)
    point, direction = torch.randn((2,) + SHAPE, generator=generator, dtype=torch.float64)
    epsilon = 1e-6
    with torch.no_grad():
        finite_difference = (model.potential(point + epsilon * direction)
                             - model.potential(point - epsilon * direction)) / (2 * epsilon)
    assert float((model(point).detach() * direction).sum()) == pytest.approx(float(finite_difference), rel=1e-6)
    for _ in range(10):
        a, b = torch.randn((2,) + SHAPE, generator=generator, dtype=torch.float64)
        assert float(((model(a) - model(b)).detach() * (a - b)).sum()) >= 0


def test_the_quadratic_term_makes_the_network_strongly_monotone_so_it_can_be_inverted():
    model = _random_lpn(seed=5)
    weight = float(model.potential.quadratic_weight.detach())
    generator = torch.Generator().manual_seed(6)
    for _ in range(10):
        a, b = torch.randn((2,) + SHAPE, generator=generator, dtype=torch.float64)
        assert float(((model(a) - model(b)).detach() * (a - b)).sum()) >= weight * float(((a - b) ** 2).sum())


def test_the_network_is_the_proximal_operator_of_the_regularizer_it_reports():
    # x = f(y) must minimise 1/2 ||x - y||^2 + R(x): any other x scores higher.
    model = _random_lpn(seed=3)
    generator = torch.Generator().manual_seed(4)
    y = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    x = model(y).detach()
    assert torch.allclose(model.invert(x), y, atol=1e-5)

    def objective(candidate):
        return float(0.5 * ((candidate - y) ** 2).sum() + model.regularizer_map(candidate).sum())

    best = objective(x)
    for scale in (1e-3, 1e-2, 1e-1):
        for _ in range(3):
            other = x + scale * torch.randn(SHAPE, generator=generator, dtype=torch.float64)
            assert objective(other) > best


def test_gradient_tiles_need_twice_the_receptive_radius_as_halo():
    model = _random_lpn(channels=4, layers=2).float()
    volume = torch.randn(1, 1, 20, 18, 17)
    whole = model(volume)
    assert torch.allclose(apply_in_tiles(model, volume, 8, model.gradient_radius), whole, atol=1e-5)
    assert not torch.allclose(apply_in_tiles(model, volume, 8, model.potential.receptive_radius), whole, atol=1e-5)


def test_proximal_matching_loss_counts_only_errors_within_its_width():
    truth, mask = torch.zeros(2, 1, 4, 4, 4), torch.ones(2, 1, 4, 4, 4)
    close, far = torch.full_like(truth, 0.1), torch.full_like(truth, 1.0)
    assert lpn.proximal_matching_loss(close, truth, mask, 1.0) < 0.02
    assert lpn.proximal_matching_loss(far, truth, mask, 0.1) > 0.99
    # A narrower width tells estimates apart that a wide one scores alike.
    wide = lpn.proximal_matching_loss(far, truth, mask, 10.0) - lpn.proximal_matching_loss(close, truth, mask, 10.0)
    narrow = lpn.proximal_matching_loss(far, truth, mask, 0.5) - lpn.proximal_matching_loss(close, truth, mask, 0.5)
    assert narrow > 10 * wide


def test_susceptibility_patches_are_lpcnns_phantoms_and_seeded():
    config = simulate.SimulationConfig()
    first = simulate.simulate_chi_batch(0, 3, 2, 16, config)
    again = simulate.simulate_chi_batch(0, 3, 2, 16, config)
    assert all(np.array_equal(a.chi_ppm, b.chi_ppm) for a, b in zip(first, again))
    assert all(sample.chi_ppm[~sample.mask].max(initial=0) == 0 for sample in first)
    assert {sample.kind for sample in simulate.simulate_chi_batch(0, 4, 8, 16, config)} == {'brain', 'shapes'}


def test_training_lowers_the_loss_writes_a_card_and_resumes(tmp_path):
    out = tmp_path / 'lpn'
    assert main(['lpn', '--out', str(out), '--steps', '8', '--checkpoint-every', '4', *TINY_TRAINING]) == 0
    card = json.loads((out / 'model_card.json').read_text())
    assert card['model'] == 'lpn' and card['steps'] == 8
    assert card['generator']['version'] == simulate.CHI_GENERATOR_VERSION
    assert card['inference'] == {'iterations': 2, 'step_size': 1.0}
    log = [json.loads(line) for line in (out / 'training_log.jsonl').read_text().splitlines()]
    validations = [entry['head_nrmse_mean'] for entry in log if 'head_nrmse_mean' in entry]
    # The untrained network adds a bias to everything; a few L1 steps remove most of it.
    assert validations[-1] < validations[0]
    assert main(['lpn', '--out', str(out), '--steps', '10', '--resume', str(out / 'checkpoint.pt'),
                 *TINY_TRAINING]) == 0
    resumed = json.loads((out / 'model_card.json').read_text())
    assert resumed['steps'] == 10 and [run['first_step'] for run in resumed['runs']] == [0, 8]


def test_shipped_lpn_inverts_better_than_tkd_and_reports_its_regularizer():
    from qsmprep.learned import models

    card, _ = models.read_card(models.SHIPPED['lpn'])
    assert card['weights']['sha256'] == models.sha256_of(models.SHIPPED['lpn'] / card['weights']['file'])
    model = models.shipped_model('lpn')
    # Brain-like patches with one orientation, from a seed (7) that neither the training nor its
    # validation (seed 0) drew from.
    config = simulate.SimulationConfig(brain_fraction=1.0, max_orientations=1, background_max_ppm=0.0)
    learned, truncated, progress = [], [], []
    for index in range(4):
        sample = simulate.simulate_batch(7, index, 1, 48, config, simulate.VALIDATION_STREAM)[0]
        field, b0_dir = sample.local_fields_ppm[0], sample.b0_dirs[0]
        chi = lpn.lpn_invert(field, sample.mask, sample.voxel_size, b0_dir, model, card['inference']['step_size'],
                             card['inference']['iterations'], device='cpu',
                             progress=lambda *call: progress.append(call))
        learned.append(metrics.nrmse(chi, sample.chi_ppm, sample.mask))
        truncated.append(metrics.nrmse(inversion.tkd(field, sample.mask, sample.voxel_size, b0_dir),
                                       sample.chi_ppm, sample.mask))
    assert np.mean(learned) < np.mean(truncated) - 3
    iterations = card['inference']['iterations']
    assert progress == [(done, iterations) for done in range(1, iterations + 1)] * 4
    # The prior penalises the noisy TKD map more than the LPN's own estimate of the same patch.
    penalty = [lpn.lpn_regularizer_map(estimate, sample.mask, sample.voxel_size, model, iterations=50).sum()
               for estimate in (chi, inversion.tkd(field, sample.mask, sample.voxel_size, b0_dir))]
    assert penalty[0] < penalty[1]
