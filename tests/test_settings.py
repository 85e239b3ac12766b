"""Typed settings: declaration, validation, command-line parsing, legacy inference."""

from __future__ import annotations

import pytest

from harness.errors import UsageError
from harness.settings import Setting, SettingError, Settings, SettingsSchema, check_profiles, schema_from_profiles

SCHEMA = SettingsSchema((
    Setting("epochs", int, 10, "training epochs", minimum=0),
    Setting("lr", float, 1e-4, "learning rate", minimum=0.0),
    Setting("layers", tuple[int, ...], (2, 3), "backbone stages"),
    Setting("mode", str, "norm_guided", "combination", choices=("norm_guided", "average"),
            choice="the code combines norm-guided; the paper text averages"),
    Setting("pretrained", bool, True, "load weights"),
    Setting("per_category", dict[str, float], {}, "per-category values"),
))


def test_resolve_applies_profile_then_overrides_with_types():
    settings = SCHEMA.resolve({"epochs": 3, "layers": [1, 2]}, {"lr": 1})
    assert isinstance(settings, Settings)
    assert settings.epochs == 3 and settings["layers"] == (1, 2) and settings.lr == 1.0
    assert isinstance(settings.lr, float) and isinstance(settings.layers, tuple)
    assert settings.mode == "norm_guided"
    with pytest.raises(AttributeError, match="immutable"):
        settings.epochs = 5
    assert settings.replace(epochs=7).epochs == 7 and settings.epochs == 3


@pytest.mark.parametrize("values, message", [
    ({"epochs": "ten"}, "expected an integer"),
    ({"epochs": -1}, "below the minimum"),
    ({"mode": "median"}, "choose from"),
    ({"pretrained": 1}, "true or false"),
    ({"layers": 3}, "a list of int"),
    ({"nosuch": 1}, "not a setting"),
])
def test_bad_profile_values_name_the_setting(values, message):
    with pytest.raises(SettingError, match=message):
        SCHEMA.resolve(values)


@pytest.mark.parametrize("text, expected", [
    ({"epochs": "5"}, {"epochs": 5}),
    ({"lr": "3e-4"}, {"lr": 3e-4}),
    ({"layers": "1,2,3"}, {"layers": (1, 2, 3)}),
    ({"layers": "[4]"}, {"layers": (4,)}),
    ({"pretrained": "false"}, {"pretrained": False}),
    ({"mode": "average"}, {"mode": "average"}),
    ({"per_category": '{"screw": 0.3}'}, {"per_category": {"screw": 0.3}}),
])
def test_command_line_values_parse_by_the_declared_type(text, expected):
    assert SCHEMA.parse_overrides(text) == expected


@pytest.mark.parametrize("text, message", [
    ({"epochs": "many"}, "--set epochs=many"),
    ({"mode": "median"}, "norm_guided"),
    ({"nosuch": "1"}, "--set nosuch: not a setting"),
    ({"pretrained": "maybe"}, "true or false"),
])
def test_bad_command_line_values_are_usage_errors_listing_what_is_allowed(text, message):
    with pytest.raises(UsageError, match=message):
        SCHEMA.parse_overrides(text)


def test_a_bad_default_is_found_when_the_plugin_is_imported():
    with pytest.raises(SettingError):
        Setting("epochs", int, "ten", "oops")


def test_differences_list_only_what_the_user_changed():
    settings = SCHEMA.resolve({"epochs": 3}, {"lr": 0.5})
    assert SCHEMA.differences(settings, {"epochs": 3}) == {"lr": 0.5}


def test_legacy_profiles_infer_types_and_keep_working():
    schema = schema_from_profiles({"paper": {"image_size": 64, "min_std": 0.02, "layers": (1, 2), "name": "x"}},
                                  {"min_std": "floor of the std"})
    assert schema.inferred
    assert schema.setting("min_std").type is float and schema.setting("min_std").help == "floor of the std"
    assert schema.parse_overrides({"layers": "3,4", "image_size": "32"}) == {"layers": (3, 4), "image_size": 32}
    assert check_profiles(schema, {"paper": {"image_size": "big"}})  # a wrong type is reported
