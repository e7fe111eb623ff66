"""The README documents what the code does: every setting with its real default, the two commands."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import AliasChoices

from service.config import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def _settings_rows() -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in README.read_text().splitlines():
        m = re.match(r"^\| `([A-Z0-9_]+)` \| (.+?) \| (.+) \|$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_readme_opens_with_the_two_commands():
    head = "\n".join(README.read_text().splitlines()[:30])
    assert "make demo" in head
    assert "make test" in head


def test_every_setting_is_in_the_readme_table_with_its_default():
    rows = _settings_rows()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        assert isinstance(alias, AliasChoices), name
        variable = alias.choices[0]
        assert isinstance(variable, str)
        assert variable in rows, f"{variable} missing from the README's settings table"
        default = field.default
        if hasattr(default, "get_secret_value"):
            default = default.get_secret_value()
        expected = "(empty)" if default in ("", None) else f"`{default}`"
        assert rows[variable] == expected, (
            f"{variable}: README says {rows[variable]}, code {expected}"
        )


def test_no_unknown_setting_in_the_readme_table():
    known = {
        f.validation_alias.choices[0]
        for f in Settings.model_fields.values()
        if isinstance(f.validation_alias, AliasChoices)
    }
    documented = {name for name in _settings_rows() if name.startswith(("BRIDGE_", "DOCUTRAY_"))}
    assert documented <= known, documented - known
