"""The universal worker agent of the RMA volunteer-compute federation (``rma-worker``)."""

from __future__ import annotations

__version__ = "0.1.0"
