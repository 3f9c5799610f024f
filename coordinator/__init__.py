"""Edge coordinator of the RMA volunteer-compute federation."""

from __future__ import annotations

__version__ = "0.1.0"
