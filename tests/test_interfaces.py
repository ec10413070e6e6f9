"""The Nipype interfaces run their science function on files and keep the grid."""
import nibabel as nib
import numpy as np
import pytest

from qsmprep import methods
from qsmprep.interfaces.qsm import Invert
from qsmprep.science.physics import DipoleOperator, b0_direction_from_affine


@pytest.fixture(scope='module')
def two_orientations(head, tmp_path_factory):
    """The head's local field for its own B0 direction and for one turned by 25 degrees."""
    folder = tmp_path_factory.mktemp('invert')
    directions = [b0_direction_from_affine(head.affine), np.array([np.sin(np.deg2rad(25)), 0.0,
                                                                  np.cos(np.deg2rad(25))])]
    paths = []
    for index, direction in enumerate(directions):
        field = DipoleOperator(head.chi.shape, head.voxel_size, direction, pad_factor=1.5).forward(head.chi)
        paths.append(folder / f'local_field_{index}.nii')
        nib.Nifti1Image(np.where(head.brain, field, 0).astype(np.float32), head.affine).to_filename(paths[-1])
    mask = folder / 'mask.nii'
    nib.Nifti1Image(head.brain.astype(np.uint8), head.affine).to_filename(mask)
    return paths, [list(direction) for direction in directions], mask


def test_invert_takes_a_list_of_local_fields_and_their_b0_directions(two_orientations, head, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths, directions, mask = two_orientations
    result = Invert(local_fields=paths[1:], b0_dirs=directions[1:], mask=mask, method='tkd').run()
    chi = nib.load(result.outputs.chi)
    field = np.asanyarray(nib.load(paths[1]).dataobj)
    expected, _ = methods.invert('tkd', [field], head.brain, head.voxel_size, directions[1:])
    assert np.allclose(chi.get_fdata(), expected, atol=1e-6)
    assert np.allclose(chi.affine, head.affine)
    # A classical method refuses two orientations rather than using one of them.
    with pytest.raises(ValueError, match='several orientations need'):
        Invert(local_fields=paths, b0_dirs=directions, mask=mask, method='tkd').run()
