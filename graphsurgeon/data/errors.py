"""The data package's own error type, so callers can tell bad data from bad models.

Derives from `GraphSurgeonError` so `except GraphSurgeonError` still catches it.
"""
from graphsurgeon.errors import GraphSurgeonError


class DataError(GraphSurgeonError):
    """A dataset file is missing or malformed, or a data argument is invalid."""


class SampleIndexError(DataError, IndexError):
    """A dataset was indexed past its end. Also an ``IndexError``: that is how a sequence tells
    ``for sample in dataset`` (and torch's samplers) where it ends."""
