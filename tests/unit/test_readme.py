"""The README documents every setting, and names no variable the settings model lacks."""

from __future__ import annotations

import re
from pathlib import Path

from consumer.settings import Settings, env_name

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_documented_and_every_documented_one_exists() -> None:
    text = README.read_text()
    documented = set(re.findall(r"`(CDC_[A-Z0-9_]+)`", text))
    settings = {env_name(field) for field in Settings.model_fields}
    assert settings - documented == set(), "settings missing from the README's configuration table"
    assert documented - settings == set(), "the README names variables that are not settings"
