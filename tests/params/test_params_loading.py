"""The params loader every stage uses: a file holds every key, once, with its real type; failures name file, key, reason."""

from typing import Annotated, Literal

import pytest
from pydantic import Field, Strict

from components.config import ParamsError, StrictModel, load_params


class Inner(StrictModel):
    rate: float = Field(gt=0)
    levels: Annotated[tuple[int, ...], Strict(False)]


class Example(StrictModel):
    name: str
    epochs: int = Field(ge=1)
    fused: bool | Literal["auto"]
    flip: bool
    inner: Inner


VALID = "name: a\nepochs: 3\nfused: auto\nflip: true\ninner: {rate: 0.5, levels: [1, 2]}\n"


def write(tmp_path, text):
    path = tmp_path / "example.yaml"
    path.write_text(text)
    return path


def problems(tmp_path, text, model=Example) -> dict[str, str]:
    path = write(tmp_path, text)
    with pytest.raises(ParamsError) as caught:
        load_params(path, model)
    assert all(line.startswith(f"{path}: ") for line in str(caught.value).splitlines()[1:])
    return dict(caught.value.problems)


def test_valid_file_loads(tmp_path):
    params = load_params(write(tmp_path, VALID), Example)
    assert (params.epochs, params.fused, params.flip, params.inner.rate, params.inner.levels) == (3, "auto", True, 0.5, (1, 2))


def test_every_problem_is_reported_with_file_and_dotted_key(tmp_path):
    found = problems(tmp_path, VALID.replace("epochs: 3", "epochs: 0").replace("rate: 0.5", "rate: -1, typo: 2") + "extra: 1\n")
    assert found["epochs"] == "Input should be greater than or equal to 1"
    assert found["inner.rate"] == "Input should be greater than 0"
    assert found["inner.typo"].startswith("unknown key (check the spelling); inner accepts rate, levels")
    assert found["extra"].startswith("unknown key (check the spelling); the file accepts name, epochs, fused, flip, inner")
    assert len(found) == 4


@pytest.mark.parametrize(
    ("old", "new", "key", "reason"),
    [
        ("epochs: 3", "epochs: many", "epochs", "valid integer"),
        ("epochs: 3", "epochs: '3'", "epochs", "valid integer"),  # a string that looks like a number
        ("epochs: 3", "epochs: 3.0", "epochs", "valid integer"),  # a float, even a whole one
        ("epochs: 3", "epochs: true", "epochs", "valid integer"),
        ("flip: true", "flip: 'yes'", "flip", "valid boolean"),  # quoted: a string, not YAML's yes
        ("flip: true", "flip: 1", "flip", "valid boolean"),
        ("fused: auto", "fused: 'true'", "fused", "valid boolean"),
        ("rate: 0.5", "rate: '0.5'", "inner.rate", "valid number"),
        ("levels: [1, 2]", "levels: [1, '2']", "inner.levels[1]", "valid integer"),
    ],
)
def test_values_are_not_coerced(tmp_path, old, new, key, reason):
    found = problems(tmp_path, VALID.replace(old, new))
    assert list(found) == [key] and reason in found[key]


@pytest.mark.parametrize(
    ("old", "new", "field", "value"),
    [
        ("flip: true", "flip: yes", "flip", True),  # YAML's own booleans are booleans
        ("flip: true", "flip: off", "flip", False),
        ("fused: auto", "fused: on", "fused", True),
        ("fused: auto", "fused: false", "fused", False),
        ("name: a", "name: '1'", "name", "1"),
    ],
)
def test_yaml_booleans_and_the_auto_switches_load(tmp_path, old, new, field, value):
    assert getattr(load_params(write(tmp_path, VALID.replace(old, new)), Example), field) == value


@pytest.mark.parametrize(("written", "value"), [("1e-4", 1e-4), ("1E-4", 1e-4), ("2.5e+3", 2.5e3), ("1.0e-4", 1e-4), ("3", 3.0)])
def test_floats_in_exponent_form_load_as_numbers(tmp_path, written, value):
    # PyYAML alone reads 1e-4 as the string "1e-4" (YAML 1.1 floats need a dot); DVC's -S writes it so.
    assert load_params(write(tmp_path, VALID.replace("rate: 0.5", f"rate: {written}")), Example).inner.rate == value


def test_a_quoted_exponent_stays_a_string_and_is_refused(tmp_path):
    assert "valid number" in problems(tmp_path, VALID.replace("rate: 0.5", "rate: '1e-4'"))["inner.rate"]


def test_a_missing_key_is_named(tmp_path):
    found = problems(tmp_path, VALID.replace("name: a\n", ""))
    assert found == {"name": "missing: every key must be given (the shipped params file lists each one with its comment)"}


def test_keys_missing_from_one_section_are_one_problem(tmp_path):
    found = problems(tmp_path, VALID.replace("inner: {rate: 0.5, levels: [1, 2]}", "inner: {}"))
    assert list(found) == ["inner"] and found["inner"].startswith("missing keys rate, levels:")


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_an_empty_file_is_an_error_naming_it(tmp_path, text):
    assert problems(tmp_path, text) == {"": "is empty: every key must be given (the shipped file lists each one)"}


def test_duplicated_keys_are_refused_with_both_lines(tmp_path):
    text = VALID.replace("flip: true\n", "flip: true\nepochs: 7\n") + "inner2:\n  a: 1\n  a: 2\n"
    found = problems(tmp_path, text)
    # Refused before validation: the duplicates are the whole report.
    assert found == {
        "epochs": "given twice, at lines 2 and 5: keep one (YAML would silently use the last)",
        "inner2.a": "given twice, at lines 8 and 9: keep one (YAML would silently use the last)",
    }


def test_an_anchor_merged_into_a_mapping_is_not_a_duplicate(tmp_path):
    text = VALID.replace("inner: {rate: 0.5, levels: [1, 2]}", "base: &base {rate: 0.5, levels: [1]}\ninner: {<<: *base}")
    assert list(problems(tmp_path, text)) == ["base"]  # only `base` is wrong: an unknown key


def test_invalid_yaml_gives_the_line(tmp_path):
    found = problems(tmp_path, "name: a\nepochs: [1\n")
    assert list(found) == [""] and found[""].startswith("not valid YAML at line 3, column 1: expected ',' or ']'")


def test_yaml_is_loaded_safely(tmp_path):
    # A python object tag would run code under an unsafe loader; here it is a plain error.
    found = problems(tmp_path, VALID.replace("name: a", "name: !!python/object/apply:os.system ['echo pwned']"))
    assert "not valid YAML" in found[""]


def test_not_a_mapping_and_missing_file(tmp_path):
    assert "must hold a mapping" in problems(tmp_path, "- 1\n- 2\n")[""]
    with pytest.raises(ParamsError, match=r"nope.yaml: file not found"):
        load_params(tmp_path / "nope.yaml", Example)


def test_a_value_fitting_no_branch_of_a_union_is_one_problem_under_its_key(tmp_path):
    found = problems(tmp_path, VALID.replace("fused: auto", "fused: maybe"))
    assert list(found) == ["fused"]
    assert "valid boolean" in found["fused"] and "'auto'" in found["fused"]
