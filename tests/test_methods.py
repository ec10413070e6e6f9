from pathlib import Path

from qsmprep import methods
from qsmprep.science import inversion


def test_every_classical_solver_is_registered_and_every_registered_method_has_a_solver():
    classical = tuple(name for name, method in methods.INVERSIONS.items() if not method.learned)
    assert classical == inversion.INVERSION_METHODS
    assert methods.LEARNED_INVERSIONS == ('lpcnn', 'lpn')
    assert methods.DEFAULT_INVERSION in classical


def test_readme_holds_the_registry_s_table():
    readme = (Path(__file__).parents[1] / 'README.md').read_text()
    assert methods.markdown_table() in readme, 'paste qsmprep.methods.markdown_table() into the README'


def test_every_method_has_a_citation_and_a_sidecar_description():
    for method in methods.INVERSIONS.values():
        assert method.citation.rstrip().endswith('.') and len(method.citation) > 40
        assert method.estimation_algorithm and method.summary
