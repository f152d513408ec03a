"""One copy of each default: command-line options take theirs from the settings dataclasses."""

from __future__ import annotations

from dataclasses import MISSING, fields


def dataclass_defaults(cls) -> dict:
    """{field name: default} of a dataclass, for fields that have one."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}
