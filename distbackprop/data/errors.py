"""The one exception the data plane raises for bad input (CLI exit status 2)."""

from __future__ import annotations

from distbackprop.errors import InputError


class DataError(InputError):
    """Unreadable, ill-typed or invalid data; each problem names the file, column and/or row.

    Row numbers in messages are 0-based positions within the named file (the CSV
    header line is not counted).
    """
