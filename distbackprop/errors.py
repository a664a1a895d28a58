"""Input errors: the leaf every layer raises from (CLI exit status 2).

`ConfigError` carries a list of problems, each naming the field, file, column
or row at fault, so that every problem is reported at once.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Invalid configuration or input; ``problems`` lists each one (exit status 2)."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class InputError(ConfigError):
    """A file, column or row that is not what it claims to be (exit status 2)."""


__all__ = ["ConfigError", "InputError"]
