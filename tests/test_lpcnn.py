"""LP-CNN: the torch dipole operator, tiled inference, the simulator and the training command.

Tiny sizes (16^3 patches, 2 blocks of 8 channels) keep the whole module within seconds on
one CPU thread.
"""
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from qsmprep.cli.train import main
from qsmprep.learned import lpcnn, simulate
from qsmprep.learned.models import load_model
from qsmprep.science import inversion, metrics
from qsmprep.science.physics import DipoleOperator

TINY_MODEL = ['--channels', '8', '--blocks', '2']
# Noise-free single-orientation shapes: a problem on which a tiny model visibly learns in 30 steps.
TINY_TRAINING = ['--patch-size', '16', '--validation-patch-size', '16', '--batch-size', '2', *TINY_MODEL, '--validation-patches', '6',
                 '--brain-fraction', '0', '--noise-max-ppm', '0', '--background-max-ppm', '0',
                 '--max-orientations', '1', '--learning-rate', '1e-3', '--log-every', '1',
                 '--validation-head-voxel-size', '0']
OBLIQUE = np.array([[0.2, -0.3, 0.93], [0.6, 0.1, 0.7]])
OBLIQUE /= np.linalg.norm(OBLIQUE, axis=1, keepdims=True)
ANISOTROPIC_VOXEL = (0.7, 1.1, 1.4)


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def _random_model(seed=0):
    """A tiny LP-CNN with every weight random (a fresh one's output convolution is zero)."""
    torch.manual_seed(seed)
    model = lpcnn.LPCNN(channels=8, blocks=2)
    for parameter in model.proximal_networks.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    return model


def _fields_and_mask(shape=(30, 28, 26), orientations=2, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, dtype=bool)
    mask[4:26, 5:24, 3:22] = True
    fields = [0.05 * rng.standard_normal(shape).astype(np.float32) for _ in range(orientations)]
    return fields, mask


def test_torch_operator_matches_the_numpy_dipole_operator_per_orientation():
    rng = np.random.default_rng(1)
    shape = (16, 20, 18)
    chi = rng.standard_normal(shape).astype(np.float32)
    operator = lpcnn.TorchDipoleOperator(shape, [ANISOTROPIC_VOXEL], [OBLIQUE], pad_factor=1.5)
    fields = operator.forward(torch.from_numpy(chi)[None, None])[0].numpy()
    for field, b0_dir in zip(fields, OBLIQUE):
        expected = DipoleOperator(shape, ANISOTROPIC_VOXEL, b0_dir, pad_factor=1.5, voxel_averaged=False).forward(chi)
        assert np.allclose(field, expected, atol=1e-5 * np.abs(expected).max())
    # Swapping the B0 direction's axes changes the field: the comparison sees axis errors.
    swapped = DipoleOperator(shape, ANISOTROPIC_VOXEL, OBLIQUE[0][[1, 0, 2]], pad_factor=1.5).forward(chi)
    assert not np.allclose(fields[0], swapped, atol=0.1 * np.abs(swapped).max())


def test_torch_operator_adjoint():
    shape = (12, 10, 14)
    operator = lpcnn.TorchDipoleOperator(shape, [ANISOTROPIC_VOXEL, (1, 1, 1)], [OBLIQUE, OBLIQUE[::-1]])
    generator = torch.Generator().manual_seed(3)
    chi = torch.randn((2, 1) + shape, generator=generator)
    fields = torch.randn((2, 2) + shape, generator=generator)
    forward_product = float((operator.forward(chi) * fields).sum())
    adjoint_product = float((chi * operator.adjoint(fields)).sum())
    assert np.isclose(forward_product, adjoint_product, rtol=1e-4)


def test_l2_starting_estimate_is_the_closed_form_l2_inversion():
    rng = np.random.default_rng(4)
    shape = (16, 16, 32)  # padded by 1.5 to the same FFT grid in both implementations
    mask = np.zeros(shape, dtype=bool)
    mask[3:14, 2:14, 4:27] = True
    chi_true = np.where(mask, rng.standard_normal(shape), 0).astype(np.float32)
    operator = lpcnn.TorchDipoleOperator(shape, [ANISOTROPIC_VOXEL], [OBLIQUE], pad_factor=1.5)
    fields = operator.forward(torch.from_numpy(chi_true)[None, None]) * torch.from_numpy(mask.astype(np.float32))
    # One orientation: the numpy L2 inversion with the same weight, padding and (point) kernel.
    one = lpcnn.TorchDipoleOperator(shape, [ANISOTROPIC_VOXEL], [OBLIQUE[:1]], pad_factor=1.5)
    chi_one = one.l2_solution(fields[:, :1], 0.01)[0, 0].numpy() * mask
    expected, _ = inversion.l2_gradient(fields[0, 0].numpy(), mask, ANISOTROPIC_VOXEL, OBLIQUE[0], lam=0.01,
                                        pad_factor=1.5, voxel_averaged=False)
    assert np.allclose(chi_one, expected, atol=1e-5 * np.abs(expected).max())
    # Two orientations constrain the cone that one leaves free: the estimate gets closer to the truth.
    chi_two = operator.l2_solution(fields, 0.01)[0, 0].numpy() * mask
    assert metrics.nrmse(chi_two, chi_true, mask) < metrics.nrmse(chi_one, chi_true, mask) - 5


def test_gcv_start_picks_the_classical_l2_weight_of_each_orientation_and_the_smallest_of_them():
    rng = np.random.default_rng(5)
    shape = (16, 16, 32)
    mask = np.zeros(shape, dtype=bool)
    mask[3:14, 2:14, 4:27] = True
    chi_true = np.where(mask, rng.standard_normal(shape), 0).astype(np.float32)
    operator = lpcnn.TorchDipoleOperator(shape, [ANISOTROPIC_VOXEL], [OBLIQUE], pad_factor=1.5)
    clean = operator.forward(torch.from_numpy(chi_true)[None, None])
    # The first orientation noisy, the second clean: each needs its own weight.
    noise = torch.from_numpy(0.5 * rng.standard_normal(shape).astype(np.float32))
    fields = torch.stack([clean[0, 0] + noise, clean[0, 1]])[None] * torch.from_numpy(mask.astype(np.float32))
    weights = []
    for orientation in range(2):
        one = lpcnn.TorchDipoleOperator(shape, [ANISOTROPIC_VOXEL], [OBLIQUE[orientation:orientation + 1]],
                                        pad_factor=1.5)
        weight = one.gcv_l2_weight(fields[:, orientation:orientation + 1], inversion.L2_LAMBDAS)
        assert weight.shape == (1, 1, 1, 1, 1)
        spectrum = np.fft.rfftn(fields[0, orientation].numpy(), s=one.fft_shape, axes=(0, 1, 2))
        expected = inversion._l2_gcv_weight(spectrum, one.kernels[0, 0].numpy(), one.gradient_spectra[0, 0].numpy(),
                                            one.fft_shape, inversion.L2_LAMBDAS)
        assert np.isclose(weight.item(), expected, rtol=1e-5)
        weights.append(expected)
    assert weights[0] > 3 * weights[1]  # GCV sees the noise
    assert np.isclose(operator.gcv_l2_weight(fields, inversion.L2_LAMBDAS).item(), weights[1], rtol=1e-5)
    # A batch is chosen for volume by volume.
    batch = lpcnn.TorchDipoleOperator(shape, [ANISOTROPIC_VOXEL] * 2, [OBLIQUE[:1], OBLIQUE[1:]], pad_factor=1.5)
    chosen = batch.gcv_l2_weight(fields.reshape(2, 1, *shape), inversion.L2_LAMBDAS).flatten().numpy()
    assert np.allclose(chosen, weights, rtol=1e-5)


def test_tiled_inference_equals_whole_volume_inference():
    fields, mask = _fields_and_mask()
    model = _random_model()
    whole = lpcnn.lpcnn_invert(fields, mask, ANISOTROPIC_VOXEL, OBLIQUE, model, device='cpu', tile=None)
    tiled = lpcnn.lpcnn_invert(fields, mask, ANISOTROPIC_VOXEL, OBLIQUE, model, device='cpu', tile=12)
    assert np.abs(whole).max() > 0.01
    assert np.allclose(tiled, whole, atol=1e-5 * np.abs(whole).max())
    assert np.all(whole[~mask] == 0)


def test_tiles_need_a_halo_as_wide_as_the_receptive_field():
    volume = torch.randn(1, 2, 20, 20, 20)
    network = _random_model().proximal_networks[0]
    with torch.no_grad():
        whole = network(volume)
        assert torch.allclose(lpcnn.apply_in_tiles(network, volume, 8, network.receptive_radius), whole, atol=1e-5)
        assert not torch.allclose(lpcnn.apply_in_tiles(network, volume, 8, 1), whole, atol=1e-3)


def test_the_cnn_in_bfloat16_agrees_with_float32_and_auto_chooses_it_on_cpus_with_bfloat16_instructions():
    fields, mask = _fields_and_mask()
    model = _random_model()
    single = lpcnn.lpcnn_invert(fields, mask, ANISOTROPIC_VOXEL, OBLIQUE, model, device='cpu', precision='float32')
    half = lpcnn.lpcnn_invert(fields, mask, ANISOTROPIC_VOXEL, OBLIQUE, model, device='cpu', precision='bfloat16')
    difference = np.linalg.norm(half - single) / np.linalg.norm(single)
    assert 0 < difference < 0.02
    capabilities = torch.cpu.get_capabilities()
    native = bool(capabilities.get('avx512_bf16') or capabilities.get('amx_bf16'))
    assert lpcnn.uses_bfloat16('auto', torch.device('cpu')) == native
    assert not lpcnn.uses_bfloat16('auto', torch.device('cuda'))
    assert lpcnn.uses_bfloat16('bfloat16', torch.device('cuda'))
    with pytest.raises(ValueError, match='precision'):
        lpcnn.uses_bfloat16('float16', torch.device('cpu'))


def test_the_reflection_average_is_symmetric_under_point_reflection_and_one_pass_is_not():
    # The dipole kernel of -b is that of b: the point-reflected fields pose the same problem,
    # reflected. The CNN alone does not commute with the reflection; the average of the two passes does.
    fields, mask = _fields_and_mask()
    model = _random_model()

    def reflected(volume):
        return np.ascontiguousarray(volume[::-1, ::-1, ::-1])

    for reflection_average in (False, True):
        direct = lpcnn.lpcnn_invert(fields, mask, ANISOTROPIC_VOXEL, OBLIQUE, model, device='cpu',
                                    reflection_average=reflection_average)
        mirrored = lpcnn.lpcnn_invert([reflected(field) for field in fields], reflected(mask), ANISOTROPIC_VOXEL,
                                      OBLIQUE, model, device='cpu', reflection_average=reflection_average)
        symmetric = np.allclose(reflected(mirrored), direct, atol=1e-5 * np.abs(direct).max())
        assert symmetric == reflection_average


def test_multi_orientation_fields_as_a_list_or_a_4d_array():
    fields, mask = _fields_and_mask(shape=(20, 22, 18), orientations=2)
    mask[:] = False
    mask[3:17, 4:18, 2:16] = True
    model = _random_model()
    from_list = lpcnn.lpcnn_invert(fields, mask, ANISOTROPIC_VOXEL, OBLIQUE, model, device='cpu')
    from_4d = lpcnn.lpcnn_invert(np.stack(fields, axis=-1), mask, ANISOTROPIC_VOXEL, OBLIQUE, model, device='cpu')
    assert np.array_equal(from_list, from_4d)
    single = lpcnn.lpcnn_invert(fields[0], mask, ANISOTROPIC_VOXEL, OBLIQUE[0], model, device='cpu')
    assert single.shape == mask.shape and not np.allclose(single, from_list)
    with pytest.raises(ValueError, match='B0 direction'):
        lpcnn.lpcnn_invert(fields, mask, ANISOTROPIC_VOXEL, OBLIQUE[0], model, device='cpu')


def test_simulator_is_seeded_and_its_field_follows_the_dipole_model():
    config = simulate.SimulationConfig(brain_fraction=1.0, noise_max_ppm=0.0, background_max_ppm=0.0,
                                       anisotropy_max_ppm=0.0)
    first = simulate.simulate_batch(7, 0, 1, 16, config)[0]
    again = simulate.simulate_batch(7, 0, 1, 16, config)[0]
    assert first.kind == 'brain' and np.array_equal(first.local_fields_ppm, again.local_fields_ppm)
    assert np.all((0.6 <= first.voxel_size) & (first.voxel_size <= 1.5))
    assert np.allclose(np.linalg.norm(first.b0_dirs, axis=1), 1)
    assert np.all(first.chi_ppm[~first.mask] == 0) and np.all(first.local_fields_ppm[:, ~first.mask] == 0)
    # The supersampled field is close to the coarse grid's dipole field of the voxel-averaged truth.
    operator = DipoleOperator(first.chi_ppm.shape, first.voxel_size, first.b0_dirs[0], pad_factor=2)
    coarse = operator.forward(first.chi_ppm)
    error = np.linalg.norm((coarse - first.local_fields_ppm[0])[first.mask]) / np.linalg.norm(coarse[first.mask])
    assert error < 0.3


def test_white_matter_anisotropy_adds_its_field_to_brain_patches_and_heads_only():
    clean = simulate.SimulationConfig(brain_fraction=1.0, noise_max_ppm=0.0, background_max_ppm=0.0,
                                      anisotropy_max_ppm=0.0)
    anisotropic = dataclasses.replace(clean, anisotropy_max_ppm=0.03)
    without, = simulate.simulate_batch(3, 0, 1, 24, clean)
    with_anisotropy, = simulate.simulate_batch(3, 0, 1, 24, anisotropic)
    # The same tissue: the truth is the mean susceptibility, which anisotropy leaves unchanged.
    assert np.array_equal(without.chi_ppm, with_anisotropy.chi_ppm)
    added = (with_anisotropy.local_fields_ppm - without.local_fields_ppm)[:, without.mask]
    # At most 2/3 of the dipole field of 0.03 ppm in white matter: well below the tissue's field.
    assert 0 < np.abs(added).max() and added.std() < 0.3 * without.local_fields_ppm[:, without.mask].std()
    shapes = dataclasses.replace(anisotropic, brain_fraction=0.0)
    assert np.array_equal(simulate.simulate_batch(3, 0, 1, 16, shapes)[0].local_fields_ppm,
                          simulate.simulate_batch(3, 0, 1, 16, dataclasses.replace(shapes, anisotropy_max_ppm=0))[0]
                          .local_fields_ppm)
    quiet, disturbed = simulate.simulate_head(0, 6.0, anisotropic, (0.0, 1.0))
    assert np.array_equal(quiet.local_fields_ppm, simulate.simulate_head(0, 6.0, clean, (0.0,))[0].local_fields_ppm)
    assert not np.array_equal(quiet.local_fields_ppm, disturbed.local_fields_ppm)


def test_a_few_training_steps_lower_the_validation_error_and_the_card_describes_them(tmp_path):
    # From a start of 0 the error is large and a tiny network reliably learns to cut it; from the
    # default L2 start, 30 tiny steps move the validation error by less than its step-to-step noise.
    assert main(['lpcnn', '--out', str(tmp_path), '--steps', '30', '--seed', '1', '--checkpoint-every', '30',
                 *TINY_TRAINING, '--initial-estimate', 'zero']) == 0
    log = [json.loads(line) for line in (tmp_path / 'training_log.jsonl').read_text().splitlines()]
    validations = [entry['validation_nrmse'] for entry in log if 'validation_nrmse' in entry]
    assert validations[-1] < validations[0] - 2
    card = json.loads((tmp_path / 'model_card.json').read_text())
    assert card['steps'] == 30 and card['generator'] == {
        'version': simulate.GENERATOR_VERSION, 'seed': 1, 'config': card['generator']['config']}
    assert card['validation']['nrmse_percent'] == validations[-1]
    # TINY_TRAINING draws random shapes alone.
    assert card['validation']['nrmse_percent_by_kind'] == {'shapes': validations[-1]}
    assert card['runs'][0]['patch_size'] == 16 and card['architecture']['channels'] == 8
    assert card['runs'][0]['precision'] == 'auto'
    assert card['runs'][0]['cnn_arithmetic'] == ('bfloat16' if lpcnn.uses_bfloat16('auto', torch.device('cpu'))
                                                 else 'float32')
    model = load_model(tmp_path)
    fields, mask = _fields_and_mask(shape=(16, 16, 16), orientations=1)
    mask[:] = True
    assert np.isfinite(lpcnn.lpcnn_invert(fields, mask, (1, 1, 1), [0, 0, 1], model, device='cpu')).all()


def test_resumed_training_continues_the_step_count_and_matches_an_uninterrupted_run(tmp_path):
    # Later arguments override TINY_TRAINING's: two orientations exercise a multi-orientation batch.
    arguments = ['--seed', '2', *TINY_TRAINING, '--validation-patches', '1', '--max-orientations', '2']
    main(['lpcnn', '--out', str(tmp_path / 'straight'), '--steps', '4', *arguments])
    main(['lpcnn', '--out', str(tmp_path / 'resumed'), '--steps', '2', *arguments])
    main(['lpcnn', '--out', str(tmp_path / 'resumed'), '--steps', '4', '--resume',
          str(tmp_path / 'resumed' / 'checkpoint.pt'), *arguments])
    checkpoint = torch.load(tmp_path / 'resumed' / 'checkpoint.pt', weights_only=True)
    assert checkpoint['step'] == 4
    card = json.loads((tmp_path / 'resumed' / 'model_card.json').read_text())
    assert card['steps'] == 4
    assert [(run['first_step'], run['last_step']) for run in card['runs']] == [(0, 2), (2, 4)]
    straight = torch.load(tmp_path / 'straight' / 'model.pt', weights_only=True)
    resumed = torch.load(tmp_path / 'resumed' / 'model.pt', weights_only=True)
    for name, value in straight.items():
        assert torch.allclose(resumed[name], value, atol=1e-6), name


def test_a_missing_resume_checkpoint_is_one_message_before_anything_is_written(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(['lpcnn', '--out', str(tmp_path / 'out'), '--resume', str(tmp_path / 'nothing.pt'), *TINY_TRAINING])
    assert stopped.value.code == 2
    assert 'nothing.pt: no such checkpoint file' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_the_mni_maps_load_without_nilearns_datasets_package():
    # A GPU machine gets only the wheels of nilearn and nibabel; nilearn.datasets imports pandas,
    # requests and scikit-learn, so the phantoms read nilearn's files without importing it.
    code = ('import sys; from qsmprep.learned import phantoms; maps = phantoms.mni_tissue_maps(); '
            'assert maps["brain"].sum() > 1e6; print(sorted(m for m in sys.modules if m.startswith("nilearn")))')
    completed = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == '[]'


def test_a_resumed_run_may_change_the_simulation_and_every_run_records_its_own(tmp_path):
    out = tmp_path / 'model'
    resume = ['--resume', str(out / 'checkpoint.pt')]
    arguments = ['--out', str(out), *TINY_TRAINING, '--validation-patches', '1']
    main(['lpcnn', '--steps', '2', *arguments])
    main(['lpcnn', '--steps', '3', *resume, *arguments, '--background-max-ppm', '0.002'])
    # Not given again: the checkpoint's settings, now the changed ones.
    main(['lpcnn', '--steps', '4', *resume, '--out', str(out), '--patch-size', '16', '--validation-patch-size', '16'])
    card = json.loads((out / 'model_card.json').read_text())
    assert [run['simulation']['background_max_ppm'] for run in card['runs']] == [0, 0.002, 0.002]
    assert card['recipe']['background_max_ppm'] == card['generator']['config']['background_max_ppm'] == 0.002
    # Each run starts by scoring the model on its own held-out patches (the second run's are new).
    log = [json.loads(line) for line in (out / 'training_log.jsonl').read_text().splitlines()]
    assert [entry['step'] for entry in log if 'validation_nrmse' in entry] == [0, 2, 2, 3, 3, 4]


def test_a_checkpoint_older_than_a_simulation_setting_resumes_with_the_value_it_was_trained_on(tmp_path):
    out = tmp_path / 'model'
    arguments = ['--out', str(out), *TINY_TRAINING, '--validation-patches', '1']
    main(['lpcnn', '--steps', '1', *arguments])
    checkpoint = torch.load(out / 'checkpoint.pt', weights_only=True)
    # As the checkpoints written before the anisotropy setting existed hold it.
    del checkpoint['recipe']['anisotropy_max_ppm']
    for run in checkpoint['runs']:
        del run['simulation']['anisotropy_max_ppm']
    torch.save(checkpoint, out / 'checkpoint.pt')
    main(['lpcnn', '--steps', '2', '--resume', str(out / 'checkpoint.pt'), *arguments])
    card = json.loads((out / 'model_card.json').read_text())
    assert [run['simulation']['anisotropy_max_ppm'] for run in card['runs']] == [0.0, 0.0]
    assert card['generator']['config']['anisotropy_max_ppm'] == 0.0


def test_a_resumed_run_may_change_the_starting_estimate_and_keeps_the_network(tmp_path):
    out = tmp_path / 'model'
    resume = ['--resume', str(out / 'checkpoint.pt')]
    arguments = ['--out', str(out), *TINY_TRAINING, '--validation-patches', '1']
    main(['lpcnn', '--steps', '2', *arguments, '--initial-estimate', 'l2'])
    before = torch.load(out / 'checkpoint.pt', weights_only=True)
    main(['lpcnn', '--steps', '2', *resume, *arguments, '--initial-estimate', 'l2_gcv'])
    after = torch.load(out / 'checkpoint.pt', weights_only=True)
    # No step taken: the network is the checkpoint's; the learned L2 weight is gone with its start.
    assert 'log_l2_weight' in before['model_state'] and 'log_l2_weight' not in after['model_state']
    for name, value in after['model_state'].items():
        assert torch.equal(value, before['model_state'][name]), name
    # Not given again: the checkpoint's start, now GCV's.
    main(['lpcnn', '--steps', '3', *resume, *arguments])
    card = json.loads((out / 'model_card.json').read_text())
    assert [run['initial_estimate'] for run in card['runs']] == ['l2', 'l2_gcv', 'l2_gcv']
    assert card['recipe']['initial_estimate'] == card['architecture']['initial_estimate'] == 'l2_gcv'
    assert np.isfinite(card['validation']['nrmse_percent'])


def test_simulation_workers_yield_the_batches_of_the_training_process_and_heads_are_scored(tmp_path):
    arguments = ['--steps', '3', *TINY_TRAINING, '--validation-patches', '1', '--validation-head-voxel-size', '8',
                 '--validation-heads', '2', '--noise-max-ppm', '0.004']
    main(['lpcnn', '--out', str(tmp_path / 'alone'), '--workers', '0', *arguments])
    main(['lpcnn', '--out', str(tmp_path / 'workers'), '--workers', '2', *arguments])
    alone = torch.load(tmp_path / 'alone' / 'model.pt', weights_only=True)
    with_workers = torch.load(tmp_path / 'workers' / 'model.pt', weights_only=True)
    for name, value in alone.items():
        assert torch.equal(with_workers[name], value), name
    card = json.loads((tmp_path / 'workers' / 'model_card.json').read_text())
    assert card['runs'][0]['simulation_workers'] == 2
    heads = card['validation']['heads']
    assert heads['voxel_size_mm'] == 8 and heads['disturbed_noise_ppm'] == 0.002
    # Two seeds, each with and without noise; the same brain in both.
    assert [(head['seed'], head['disturbed']) for head in heads['per_head']] == [(0, True), (0, False),
                                                                                  (1, True), (1, False)]
    assert heads['per_head'][0]['shape'] == heads['per_head'][1]['shape']
    assert np.isfinite([head['scale'] for head in heads['per_head']]).all()
    # The bar of TV on the same brains, beside the model's scores.
    tv_scores = [head['tv_nrmse_percent'] for head in heads['per_head']]
    assert heads['tv_nrmse_percent_mean'] == pytest.approx(np.mean(tv_scores))
    assert 0 < heads['tv_nrmse_percent_mean'] < 200
    log = [json.loads(line) for line in (tmp_path / 'workers' / 'training_log.jsonl').read_text().splitlines()]
    assert log[-1]['head_nrmse_mean'] == heads['nrmse_percent_mean'] == pytest.approx(
        np.mean([head['nrmse_percent'] for head in heads['per_head']]))


def test_validation_head_is_a_whole_brain_whose_field_follows_the_dipole_model():
    config = simulate.SimulationConfig(noise_max_ppm=0, background_max_ppm=0, anisotropy_max_ppm=0)
    head, = simulate.simulate_head(0, 6.0, config)
    assert head.kind == 'head' and head.local_fields_ppm.shape == (1, *head.mask.shape)
    # The template's brain, about 140 x 175 x 140 mm, in a random rotation, cropped to its mask.
    extent_mm = np.array(head.mask.shape) * 6.0
    assert extent_mm.min() > 120 and extent_mm.max() < 200 and head.mask.mean() > 0.25
    assert np.array_equal(head.chi_ppm, simulate.simulate_head(0, 6.0, config)[0].chi_ppm)
    # Several disturbance levels share one phantom: without disturbance, the field above.
    noisy, quiet = simulate.simulate_head(0, 6.0, dataclasses.replace(config, noise_max_ppm=0.01), (0.5, 0.0))
    assert np.array_equal(noisy.chi_ppm, head.chi_ppm) and np.array_equal(quiet.local_fields_ppm, head.local_fields_ppm)
    assert (noisy.local_fields_ppm - head.local_fields_ppm)[0][head.mask].std() == pytest.approx(0.005, rel=0.1)
    operator = DipoleOperator(head.mask.shape, head.voxel_size, head.b0_dirs[0], pad_factor=2)
    coarse = np.where(head.mask, operator.forward(head.chi_ppm), 0)
    field = head.local_fields_ppm[0]
    assert np.corrcoef(coarse[head.mask], field[head.mask])[0, 1] > 0.8


def test_load_model_refuses_weights_that_do_not_match_the_card(tmp_path):
    main(['lpcnn', '--out', str(tmp_path), '--steps', '1', *TINY_TRAINING, '--validation-patches', '1'])
    load_model(tmp_path / 'model_card.json')
    weights = tmp_path / 'model.pt'
    state = torch.load(weights, weights_only=True)
    state['step_size'] = state['step_size'] + 1
    torch.save(state, weights)
    with pytest.raises(ValueError, match='sha256'):
        load_model(tmp_path)


def test_shipped_model_matches_its_card_and_reproduces_its_validation_scores():
    from qsmprep.learned import models, recipe as recipes, validation

    card, _ = models.read_card(models.SHIPPED['lpcnn'])
    recipe = card['recipe']
    assert card['weights']['sha256'] == models.sha256_of(models.SHIPPED['lpcnn'] / card['weights']['file'])
    assert card['generator']['version'] == simulate.GENERATOR_VERSION
    model = models.shipped_model('lpcnn')
    config = recipes.simulation_config(recipe)
    # The first held-out patches, drawn as the training command draws them.
    for index in range(2):
        sample = simulate.simulate_batch(recipe['seed'], index, 1, recipe['validation_patch_size'], config,
                                         simulate.VALIDATION_STREAM)[0]
        score = validation.validate(model, [sample], torch.device('cpu'), recipe['loss'])['validation_nrmse']
        assert score == pytest.approx(card['validation']['nrmse_percent_per_patch'][index], abs=0.05)


def test_shipped_model_beats_tkd_on_brain_like_phantoms_it_was_not_trained_on():
    from qsmprep.learned import models, recipe

    card, _ = models.read_card(models.SHIPPED['lpcnn'])
    model = models.shipped_model('lpcnn')
    # Brain-like patches with one orientation and no residual background, from a seed (7) that
    # neither the training nor its validation (seed 0) drew from.
    config = dataclasses.replace(recipe.simulation_config(card['recipe']), brain_fraction=1.0, max_orientations=1,
                                 background_max_ppm=0.0)
    learned, truncated = [], []
    for index in range(6):
        sample = simulate.simulate_batch(7, index, 1, 48, config, simulate.VALIDATION_STREAM)[0]
        field, b0_dir = sample.local_fields_ppm[0], sample.b0_dirs[0]
        chi = lpcnn.lpcnn_invert(field, sample.mask, sample.voxel_size, b0_dir, model, device='cpu', tile=None)
        learned.append(metrics.nrmse(chi, sample.chi_ppm, sample.mask))
        truncated.append(metrics.nrmse(inversion.tkd(field, sample.mask, sample.voxel_size, b0_dir),
                                       sample.chi_ppm, sample.mask))
    assert np.mean(learned) < np.mean(truncated) - 3


def test_a_cone_restricted_correction_leaves_the_well_measured_frequencies_alone():
    shape, voxel_size, b0_dir = (24, 22, 20), (1.0, 1.0, 1.0), OBLIQUE[0]
    # Unpadded, so that the grid's frequencies are the kernel's (padded, the crop mixes them).
    operator = lpcnn.TorchDipoleOperator(shape, [voxel_size], [[b0_dir]], pad_factor=1.0)
    correction = torch.randn((1, 1) + shape)
    original = torch.fft.rfftn(correction, dim=(-3, -2, -1))[0, 0]
    kept = torch.fft.rfftn(operator.ill_conditioned_part(correction, lpcnn.CONE_THRESHOLD), dim=(-3, -2, -1))[0, 0]
    kernel = operator.kernels[0, 0].abs()
    # Off the Nyquist planes, where an oblique kernel is not Hermitian and the real FFT folds it.
    inner = torch.ones_like(kernel, dtype=torch.bool)
    inner[shape[0] // 2], inner[:, shape[1] // 2], inner[..., shape[2] // 2] = False, False, False
    assert kept[inner & (kernel >= lpcnn.CONE_THRESHOLD)].abs().max() < 1e-5 * original.abs().max()
    # Within the threshold the share rises to all of it where the kernel vanishes.
    share = 1 - (kernel / lpcnn.CONE_THRESHOLD).clamp(max=1)
    assert torch.allclose(kept[inner], (share * original)[inner], atol=1e-5 * original.abs().max())

    model = _random_model()
    fields, mask = _fields_and_mask(shape)
    free = lpcnn.lpcnn_invert(fields, mask, voxel_size, OBLIQUE, model, device='cpu', reflection_average=False)
    model.correction = 'cone'
    restricted = lpcnn.lpcnn_invert(fields, mask, voxel_size, OBLIQUE, model, device='cpu', reflection_average=False)
    assert not np.allclose(free, restricted, atol=1e-4)
