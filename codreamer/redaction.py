"""Secrets never leave the process: one list of credential names and one way to blank a secret out.

`is_secret_name` says whether a setting, argument or key names a credential (`api_key`,
`events_secret`, `auth_token`, `password`, ...) but not an ordinary count such as
`max_tokens`; every place that shows settings or call inputs (run reports, the local trace,
the W&B config) drops or masks such values. `redact` replaces known secret values in free
text, such as an error message that echoes the key a server refused.
"""

from __future__ import annotations

import re

from pydantic import SecretStr

__all__ = ["MASK", "SECRET_NAME", "is_secret_name", "redact"]

MASK = "***"
SECRET_NAME = re.compile(
    r"api_?key|secret|passw(?:or)?d|authorization|credential|token$|^key$",
    re.IGNORECASE,
)
"""Credential names: an API key, secret, password or credential anywhere in the name, a name
ending in `token` (`auth_token`, `hf_token`; not `max_tokens`), or just `key`."""


def is_secret_name(name: object) -> bool:
    """True for names of credentials (`api_key`, `events_secret`, `auth_token`, ...), not `max_tokens`."""
    return SECRET_NAME.search(str(name)) is not None


def redact(text: str, *secrets: SecretStr | str | None) -> str:
    """`text` with every non-empty secret replaced by `***` (None and empty secrets are skipped)."""
    for secret in secrets:
        value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
        if value:
            text = text.replace(value, MASK)
    return text
