"""`pairgan tune --apply`: the best params go into params/*.yaml value by value, the files' comments stay."""

import difflib
import shutil
from pathlib import Path

import pytest
import yaml

from components.tuning.adopt import AdoptError, apply_values, dvc_exp_command, set_value
from pipelines.cli import main as pairgan

PROJECT = Path(__file__).resolve().parents[2]

NESTED = """\
# header comment
top: 1            # a trailing comment
outer:
  # a comment inside
  inner:
    leaf: 0.5     # keep me
    list: [a, b, c]   # flow list
    flow: {x: 1, y: 2}
  gan: null       # null: switched off
  block:
    - 1
    - 2
last: end
"""


def changed_lines(before: str, after: str) -> list[str]:
    return [line for line in difflib.ndiff(before.splitlines(), after.splitlines()) if line[:1] in "+-"]


def test_values_are_replaced_in_place_and_nothing_else_changes():
    after = apply_values(NESTED, {"outer.inner.leaf": 0.75, "outer.inner.list": ["a", "d"], "top": 2}, "nested.yaml")
    assert changed_lines(NESTED, after) == [
        "- top: 1            # a trailing comment",
        "+ top: 2            # a trailing comment",
        "-     leaf: 0.5     # keep me",
        "+     leaf: 0.75    # keep me",
        "-     list: [a, b, c]   # flow list",
        "+     list: [a, d]      # flow list",
    ]


def test_a_key_under_null_becomes_a_flow_mapping_and_a_missing_key_a_new_line():
    after = apply_values(NESTED, {"outer.gan.t_min": 5, "outer.gan.d_target": 0.6, "outer.inner.new": "yes please"},
                         "nested.yaml")
    assert "  gan: {t_min: 5, d_target: 0.6} # null: switched off\n" in after
    assert "    flow: {x: 1, y: 2}\n    new: yes please\n  gan:" in after
    assert yaml.safe_load(after)["outer"]["gan"] == {"t_min": 5, "d_target": 0.6}
    assert after.startswith("# header comment\n") and "  # a comment inside\n" in after


def test_flow_mappings_block_lists_and_the_last_key_of_a_file():
    after = apply_values(NESTED, {"outer.inner.flow.y": 3, "outer.block": [3], "last": "changed"}, "nested.yaml")
    loaded = yaml.safe_load(after)
    assert loaded["outer"]["inner"]["flow"] == {"x": 1, "y": 3}
    assert loaded["outer"]["block"] == [3] and loaded["last"] == "changed"
    assert "    leaf: 0.5     # keep me\n" in after


def test_a_key_under_a_value_is_refused():
    with pytest.raises(AdoptError, match="nested.yaml: top.deeper: cannot be set"):
        apply_values(NESTED, {"top.deeper": 1}, "nested.yaml")
    with pytest.raises(AdoptError, match="whole mapping"):
        set_value(NESTED, "outer.inner", {"leaf": 1}, "nested.yaml")


def copy_params(folder: Path) -> Path:
    shutil.copytree(PROJECT / "params", folder)
    return folder


def write_best(path: Path, document: dict) -> Path:
    path.write_text("# written by pairgan tune\n" + yaml.safe_dump(document, sort_keys=False))
    return path


def test_apply_writes_the_best_params_into_the_shipped_files_keeping_every_comment(tmp_path, capsys):
    params = copy_params(tmp_path / "params")
    before = {name: (params / name).read_text() for name in ("model.yaml", "train.yaml")}
    # A sweep's best params: the whole Diffusion-GAN block of params/tune.yaml's fixed, as leaves.
    diffusion_gan = {**yaml.safe_load((PROJECT / "params/tune.yaml").read_text())["fixed"]["model.method.diffusion_gan"],
                     "t_max": 250, "d_target": 0.62}
    best = write_best(tmp_path / "best_params.yaml", {
        "model.yaml": {**{f"method.diffusion_gan.{key}": value for key, value in diffusion_gan.items()},
                       "method.generator.ngf": 32},
        "train.yaml": {"optimizer.lr_g": 0.0001},
    })
    assert pairgan(["tune", "--apply", str(best), "--params-dir", str(params)]) == 0

    model, train = (params / "model.yaml").read_text(), (params / "train.yaml").read_text()
    model_changes = changed_lines(before["model.yaml"], model)
    assert len(model_changes) == 4, model_changes  # two lines, each - and +
    assert all("#" in line for line in model_changes)  # their comments kept
    assert yaml.safe_load(model)["method"]["diffusion_gan"] == diffusion_gan
    assert yaml.safe_load(model)["method"]["generator"]["ngf"] == 32
    comments = [line for line in before["model.yaml"].splitlines() if line.lstrip().startswith("#")]
    assert comments == [line for line in model.splitlines() if line.lstrip().startswith("#")]
    removed, added = changed_lines(before["train.yaml"], train)
    assert removed.startswith("-   lr_g: ") and added.startswith("+   lr_g: 0.0001")
    assert removed.partition("#")[1:] == added.partition("#")[1:]  # the same comment
    assert yaml.safe_load(train)["optimizer"]["lr_g"] == 0.0001

    out = capsys.readouterr().out
    assert "dvc exp run" in out
    assert f"{params}/model.yaml:++method.diffusion_gan.t_min=5" in out  # under null: Hydra's add-or-override
    assert f"{params}/model.yaml:method.generator.ngf=32" in out


@pytest.mark.parametrize(("document", "message"), [
    ({"model.yaml": {"method.generator.ngf": -1}}, "model.yaml: method.generator.ngf"),
    ({"model.yaml": {"method.generator.ngf": 32}, "train.yaml": {"optimizer.lr_gen": 0.1}}, "train.yaml: optimizer.lr_gen"),
    ({"data.yaml": {"image_size": 32}}, "data.yaml: not a params file a sweep sets"),
    ({"model.yaml": {"method.name.deeper": 1}}, "method.name holds the value"),
])
def test_a_bad_best_params_file_writes_nothing(tmp_path, capsys, document, message):
    params = copy_params(tmp_path / "params")
    before = {path: path.read_bytes() for path in params.rglob("*.yaml")}
    best = write_best(tmp_path / "best_params.yaml", document)
    assert pairgan(["tune", "--apply", str(best), "--params-dir", str(params)]) == 2
    assert message in capsys.readouterr().err
    assert {path: path.read_bytes() for path in params.rglob("*.yaml")} == before


def test_a_params_file_with_a_duplicated_key_is_refused_and_nothing_is_written(tmp_path, capsys):
    # Editing one of two `epochs:` spans would leave the other one deciding what trains.
    params = copy_params(tmp_path / "params")
    train = params / "train.yaml"
    train.write_text(train.read_text() + "epochs: 3\n")
    before = {path: path.read_bytes() for path in params.rglob("*.yaml")}
    best = write_best(tmp_path / "best_params.yaml", {"model.yaml": {"method.generator.ngf": 32},
                                                      "train.yaml": {"epochs": 7}})
    assert pairgan(["tune", "--apply", str(best), "--params-dir", str(params)]) == 2
    error = capsys.readouterr().err
    assert str(train) in error and "epochs" in error
    assert {path: path.read_bytes() for path in params.rglob("*.yaml")} == before


def test_the_dvc_line_adds_only_keys_the_file_lacks():
    line = dvc_exp_command({"model.yaml": {"method.diffusion_gan.d_target": 0.7, "method.generator.ngf": 32},
                            "train.yaml": {"validation.guidance_weights": [0.0, 1.0]}},
                           "params", {"model.yaml": {"method": {"generator": {"ngf": 16}, "diffusion_gan": None}},
                                      "train.yaml": {"validation": {"guidance_weights": [0.0]}}})
    assert line == ("dvc exp run -S params/model.yaml:++method.diffusion_gan.d_target=0.7 "
                    "-S params/model.yaml:method.generator.ngf=32 "
                    "-S 'params/train.yaml:validation.guidance_weights=[0.0, 1.0]'")
