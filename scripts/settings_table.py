"""Print the settings table of the README from the Settings class (the single source of truth).

    .venv/bin/python scripts/settings_table.py
"""

from __future__ import annotations

from service.settings import Settings


def _show(default: object) -> str:
    if default is None:
        return "unset"
    if default == []:
        return "empty"
    return str(default).lower() if isinstance(default, bool) else str(default)


def table() -> str:
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        shown = _show(field.get_default(call_default_factory=True))
        lines.append(f"| `RESIDUAL_{name.upper()}` | `{shown}` | {field.description or ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())  # noqa: T201
