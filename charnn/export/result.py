"""What an export wrote (its own module: each format's module returns one, and the
package's dispatcher imports those modules)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ExportResult:
    """What was written: the path, its size, and what the format reports
    (for the web page: the weights' storage and the loss it measured)."""

    path: Path
    bytes: int
    format: str
    details: dict[str, object] = field(default_factory=dict)
