"""The exceptions dask_ftps raises; every one is an :class:`FTPSError`."""

from __future__ import annotations


class FTPSError(Exception):
    """Base class of every dask_ftps error."""


class InvalidUpdate(FTPSError, ValueError):
    """A pushed update is malformed: bad id, names, shape, dtype or values."""


class InvalidRequest(FTPSError, ValueError):
    """A request to the parameter server has bad arguments."""


class DuplicateUpdate(FTPSError):
    """An update id that the parameter server has already accepted."""


class StaleIncarnation(FTPSError):
    """A message from an older (or another) parameter-server incarnation."""


class SpecMismatch(FTPSError, ValueError):
    """A model, optimizer or run spec differs from the one the server holds."""


class StoreLocked(FTPSError):
    """Another live parameter server already writes this store."""


class NotRegistered(FTPSError, RuntimeError):
    """No :class:`~dask_ftps.ParameterServer` is registered on the scheduler."""


class WaitTimeout(FTPSError, TimeoutError):
    """A pull waited longer than ``ftps.wait-timeout`` for its sync round or ssp bound."""
