"""The config schema (`config/fields.py`): one spec per field, and every field refuses a value of
the wrong type and one out of its range with a message naming it, wherever the config came from."""

import math
from pathlib import Path

import ml_collections
import pytest

from gigajax.config import base_config, load_config, validate
from gigajax.config.fields import APPLIES_ONLY, FIELDS, USED_ONLY, Field
from gigajax.errors import ConfigError
from gigajax.train.preflight import notes

ROOT = Path(__file__).resolve().parents[1]


def leaves(node: ml_collections.ConfigDict, where: str = "") -> list[str]:
    out = []
    for key, value in node.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += leaves(value, f"{where}{key}.")
        else:
            out.append(f"{where}{key}")
    return out


def wrong_types(spec: Field) -> list:
    """Values of another type than the field's (a bool is never an int or a float here)."""
    if spec.kind is bool:
        return [1, "true", None]
    if spec.kind is str:
        return [3, True, None] if spec.choices else [3, True]
    if spec.kind is int:
        return [True, 1.5, "3"] + ([] if spec.none_ok else [None])
    return [True, "0.1"] + ([] if spec.none_ok else [None])


def out_of_range(spec: Field) -> list:
    """Values of the right type that the field refuses: outside its range or choices, and inf
    and NaN for floats."""
    if spec.choices:
        return ["not-a-choice"] if spec.kind is str else [max(spec.choices) + 1]
    if spec.kind not in (int, float):
        return []
    bad = [] if spec.kind is int else [math.inf, -math.inf, math.nan]
    if spec.low is not None:
        bad.append(spec.low if spec.low_open else spec.low - 1)
    if spec.high is not None:
        bad.append(spec.high if spec.high_open else spec.high + 1)
    if spec.kind is int:
        bad = [int(b) for b in bad if int(b) not in spec.extra]
    return bad


def config_with(field: str, value) -> ml_collections.ConfigDict:
    """base_config() with `field` set to `value`, built as a config file could build it (a new
    ConfigDict from a dict, so ConfigDict's own type locking does not stand in the way)."""
    tree = base_config().to_dict()
    *parents, leaf = field.split(".")
    node = tree
    for name in parents:
        node = node[name]
    node[leaf] = value
    return ml_collections.ConfigDict(tree)


CASES = [(field, value) for field, spec in FIELDS.items()
         for value in wrong_types(spec) + out_of_range(spec)]


def test_the_schema_has_one_spec_per_field_of_the_base_config():
    assert sorted(FIELDS) == sorted(leaves(base_config()))
    for table in (APPLIES_ONLY, USED_ONLY):
        assert set(table) <= set(FIELDS)
        assert all(depends_on in FIELDS for depends_on, _ in table.values())


def test_every_field_has_a_wrong_type_and_numbers_and_choices_a_range():
    """So that the refusal test below covers every field; free text and flags have no range."""
    for field, spec in FIELDS.items():
        assert wrong_types(spec), field
        if spec.kind in (int, float) or spec.choices:
            assert out_of_range(spec), field


def test_the_base_config_and_every_shipped_config_pass():
    validate(base_config())
    for path in sorted((ROOT / "configs").glob("*.py")):
        if path.name != "__init__.py":
            load_config(path)


@pytest.mark.parametrize("field,value", CASES, ids=[f"{f}={v!r}" for f, v in CASES])
def test_every_field_refuses_bad_values_by_name(field, value):
    with pytest.raises(ConfigError, match=rf"config\.{field.replace('.', '[.]')}="):
        validate(config_with(field, value))


@pytest.mark.parametrize("override,field", [
    ("train.steps=True", "train.steps"),
    ("optim.lr=1e999", "optim.lr"),
    ("optim.b2=1.5", "optim.b2"),
    ("optim.eps=-1", "optim.eps"),
    ("train.seed=-1", "train.seed"),
    ("mesh.data=2.0", "mesh.data"),
])
def test_command_line_overrides_are_checked_the_same_way(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", "[.]")):
        load_config(base_config(), [f"--config.{override}"])


@pytest.mark.parametrize("overrides,field", [
    ({"data.path": "data/prepared"}, "data.path"),
    ({"data.mixture": "a=0.5,b=0.5"}, "data.mixture"),
    ({"data.passkey.key_digits": 7}, "data.passkey.key_digits"),
    ({"model.rope_scaling.factor": 4.0}, "model.rope_scaling.factor"),
    ({"model.rope_scaling.type": "linear", "model.rope_scaling.factor": 4.0,
      "model.rope_scaling.beta_fast": 16.0}, "model.rope_scaling.beta_fast"),
    ({"optim.wsd_decay_fraction": 0.5}, "optim.wsd_decay_fraction"),
    ({"attention.ulysses_degree": 2}, "attention.ulysses_degree"),
])
def test_a_field_that_would_be_ignored_is_refused(overrides, field):
    with pytest.raises(ConfigError, match=rf"config\.{field.replace('.', '[.]')}=.*only applies"):
        load_config(base_config(), overrides)


def test_a_field_unused_by_a_switched_choice_is_named_in_the_run_notes():
    """Config files set these for one choice and the command line switches it: a note, not a
    refusal (docs/design.md)."""
    cfg = load_config(base_config(), {"optim.name": "adafactor", "optim.b2": 0.99,
                                      "data.max_bytes": 1000, "data.source": "passkey"})
    assert "optim.b2=0.99 is not used with optim.name='adafactor'" in notes(cfg)
    assert "data.max_bytes=1000 is not used with data.source='passkey'" in notes(cfg)
    assert not [n for n in notes(base_config()) if "not used" in n]


def test_the_same_fields_pass_where_they_apply():
    load_config(base_config(), {"model.rope_scaling.type": "yarn",
                                "model.rope_scaling.factor": 4.0,
                                "model.rope_scaling.beta_fast": 16.0,
                                "optim.schedule": "wsd", "optim.wsd_decay_fraction": 0.5,
                                "optim.name": "lion", "optim.b2": 0.99})


def test_an_unknown_key_set_in_a_config_file_is_refused(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text("from gigajax.config import base_config\n\n"
                    "def get_config():\n    c = base_config()\n    c.train.stepz = 3\n"
                    "    return c\n")
    with pytest.raises(ConfigError, match=r"Unknown config field 'train.stepz' \(did you mean "
                                          r"'steps'\?\)"):
        load_config(path)


def test_a_missing_section_or_a_new_one_is_refused():
    cfg = base_config()
    del cfg.checkpoint
    with pytest.raises(ConfigError, match="config.checkpoint is missing"):
        validate(cfg)
    cfg = base_config()
    cfg.extra = {"a": 1}
    with pytest.raises(ConfigError, match="Unknown config field 'extra'"):
        validate(cfg)


def test_a_config_file_that_raises_is_one_message_with_its_line(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def get_config():\n    return 1 / 0\n")
    with pytest.raises(ConfigError, match=r"broken.py' failed at line 2: ZeroDivisionError"):
        load_config(path)
    path.write_text("def get_config(:\n")
    with pytest.raises(ConfigError, match=r"failed at line 1: SyntaxError"):
        load_config(path)
    path.write_text("def get_config():\n    return {'train': {}}\n")
    with pytest.raises(ConfigError, match="returned dict"):
        load_config(path)
