"""Write `.env.example` from `codreamer.config.Settings`, so the file never drifts from the code.

Run: `uv run python scripts/make_env_example.py` (a test checks every setting is in the file).
"""

from __future__ import annotations

from pathlib import Path

from codreamer.config import Settings

HEADER = """\
# CoDreamer settings. Copy to .env and uncomment what you change; flags (`--name`) override.
# Every line is commented: the defaults run the embedded CPU backend offline with no keys.
"""


def env_name(name: str) -> str:
    field = Settings.model_fields[name]
    aliases = getattr(field.validation_alias, "choices", None) or []
    upper = [a for a in aliases if isinstance(a, str) and a.isupper()]
    return upper[0] if upper else f"CODREAMER_{name.upper()}"


def render() -> str:
    lines = [HEADER]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "" if default is None else (str(default).lower() if isinstance(default, bool) else str(default))
        if name == "data_dir" or name == "model_cache_dir":
            shown = ""  # machine-specific absolute paths; the code's default applies
        lines.append(f"# {field.description}")
        lines.append(f"# {env_name(name)}={shown}\n")
    return "\n".join(lines)


if __name__ == "__main__":
    target = Path(__file__).resolve().parent.parent / ".env.example"
    target.write_text(render(), encoding="utf-8")
    print(f"wrote {target}")
