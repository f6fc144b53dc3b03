import json

import pytest

from staralign.definitions import (
    BUILTIN_DEFINITIONS,
    DefinitionError,
    LandmarkDefinition,
    definition_for_num_points,
    get_definition,
)

from .conftest import reference_path


@pytest.mark.parametrize("name", BUILTIN_DEFINITIONS)
def test_builtin_matches_reference_facts(name):
    ref = json.loads(reference_path("definitions.json").read_text())[name]
    d = get_definition(name)
    ours = d.to_dict()
    for key, value in ref.items():
        if key == "edges":
            assert [{"closed": e["closed"], "indices": e["indices"]} for e in ours["edges"]] == value
        else:
            assert ours[key] == value, key


def test_sizes_and_lookup():
    assert get_definition("wflw").num_points == 98
    assert get_definition("300W").num_points == 68
    assert get_definition("COFW").num_points == 29
    assert get_definition("300VW").num_edges == 9
    assert definition_for_num_points(29).name == "COFW"
    with pytest.raises(DefinitionError, match="no built-in"):
        definition_for_num_points(5)
    with pytest.raises(DefinitionError, match="unknown landmark definition"):
        get_definition("NOPE")


def test_definition_is_immutable_and_round_trips():
    d = get_definition("WFLW")
    with pytest.raises(AttributeError):
        d.num_points = 3  # type: ignore[misc]
    assert LandmarkDefinition.from_dict(d.to_dict()) == d
    assert hash(d) == hash(LandmarkDefinition.from_dict(d.to_dict()))


def test_flip_permutation_is_an_involution():
    for name in BUILTIN_DEFINITIONS:
        perm = get_definition(name).flip_permutation()
        assert sorted(perm) == list(range(len(perm)))
        assert [perm[p] for p in perm] == list(range(len(perm)))


CUSTOM = """
name: Tiny
num_points: 6
edges:
  - {closed: false, indices: [0, 1, 2], name: brow}
  - {closed: true, indices: [3, 4, 5]}
flip_pairs: [[0, 2], [3, 5]]
nme_default: {left: 0, right: 2}
nme_pupil: {left: [3, 4], right: [4, 5]}
fr_auc_threshold: 0.08
"""


def test_user_definition_from_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(CUSTOM)
    d = get_definition(path)
    assert (d.name, d.num_points, d.num_edges) == ("Tiny", 6, 2)
    assert d.nme_ocular == d.nme_default  # missing normalisations fall back to default
    assert d.nme_pupil.left == (3, 4)
    assert d.flip_x_offset == -1
    assert d.fr_auc_threshold == 0.08
    js = tmp_path / "tiny.json"
    js.write_text(json.dumps(d.to_dict()))
    assert get_definition(js) == d


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ("num_points: 6", "num_points"),
        ("indices: [0, 1, 2], name: brow", "edges[0].indices[2]"),
        ("flip_pairs: [[0, 2], [3, 5]]", "flip_pairs[1]"),
        ("nme_default: {left: 0, right: 2}", "nme_default.right"),
        ("fr_auc_threshold: 0.08", "fr_auc_threshold"),
    ],
)
def test_invalid_files_name_the_field(tmp_path, change, field):
    bad = {
        "num_points: 6": "num_points: -1",
        "indices: [0, 1, 2], name: brow": "indices: [0, 1, 9], name: brow",
        "flip_pairs: [[0, 2], [3, 5]]": "flip_pairs: [[0, 2], [2, 5]]",
        "nme_default: {left: 0, right: 2}": "nme_default: {left: 0, right: x}",
        "fr_auc_threshold: 0.08": "fr_auc_threshold: 3",
    }
    path = tmp_path / "bad.yaml"
    path.write_text(CUSTOM.replace(change, bad[change]))
    with pytest.raises(DefinitionError) as info:
        get_definition(path)
    assert str(path) in str(info.value)
    assert f"'{field}'" in str(info.value)


def test_unknown_key_and_bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(CUSTOM + "colour: red\n")
    with pytest.raises(DefinitionError, match="'colour'"):
        get_definition(path)
    path.write_text("name: [unclosed\n")
    with pytest.raises(DefinitionError, match="not valid YAML"):
        get_definition(path)
