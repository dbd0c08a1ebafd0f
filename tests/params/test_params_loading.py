"""The params loader every stage uses: failures name the file, the key and the reason."""

from typing import Literal

import pytest
from pydantic import Field

from components.config import ParamsError, StrictModel, load_params


class Inner(StrictModel):
    rate: float = Field(gt=0)


class Example(StrictModel):
    name: str
    epochs: int = Field(ge=1)
    inner: Inner = Inner(rate=1.0)


def write(tmp_path, text):
    path = tmp_path / "example.yaml"
    path.write_text(text)
    return path


def test_valid_file_loads(tmp_path):
    params = load_params(write(tmp_path, "name: a\nepochs: 3\ninner: {rate: 0.5}\n"), Example)
    assert params.epochs == 3 and params.inner.rate == 0.5


def test_every_problem_is_reported_with_file_and_dotted_key(tmp_path):
    path = write(tmp_path, "name: a\nepochs: 0\ninner: {rate: -1, typo: 2}\nextra: 1\n")
    with pytest.raises(ParamsError) as caught:
        load_params(path, Example)
    message = str(caught.value)
    assert f"{path}: epochs: Input should be greater than or equal to 1" in message
    assert f"{path}: inner.rate: Input should be greater than 0" in message
    assert f"{path}: inner.typo: unknown key" in message
    assert f"{path}: extra: unknown key" in message
    assert len(caught.value.problems) == 4


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ParamsError, match=r"example.yaml: epochs: Input should be a valid integer"):
        load_params(write(tmp_path, "name: a\nepochs: many\n"), Example)


def test_missing_required_key(tmp_path):
    with pytest.raises(ParamsError, match=r"example.yaml: name: Field required"):
        load_params(write(tmp_path, "epochs: 2\n"), Example)


def test_invalid_yaml_gives_the_line(tmp_path):
    with pytest.raises(ParamsError, match=r"example.yaml: not valid YAML at line \d+, column \d+: expected ',' or ']'"):
        load_params(write(tmp_path, "name: a\nepochs: [1\n"), Example)


def test_yaml_is_loaded_safely(tmp_path):
    # A python object tag would run code under an unsafe loader; here it is a plain error.
    path = write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\nepochs: 1\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path, Example)


def test_not_a_mapping_and_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="must hold a mapping"):
        load_params(write(tmp_path, "- 1\n- 2\n"), Example)
    with pytest.raises(ParamsError, match=r"nope.yaml: file not found"):
        load_params(tmp_path / "nope.yaml", Example)


class Switches(StrictModel):
    fused: bool | Literal["auto"] = "auto"


def test_a_value_fitting_no_branch_of_a_union_is_one_problem_under_its_key(tmp_path):
    with pytest.raises(ParamsError) as caught:
        load_params(write(tmp_path, "fused: maybe\n"), Switches)
    assert [key for key, _ in caught.value.problems] == ["fused"]
    assert "valid boolean" in caught.value.problems[0][1] and "'auto'" in caught.value.problems[0][1]
