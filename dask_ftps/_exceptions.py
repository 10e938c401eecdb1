"""The exceptions dask_ftps raises; every one is an :class:`FTPSError`.

::

    FTPSError
    ├── InvalidUpdate (ValueError)        a malformed push: id, names, shapes, values
    │   └── OutOfOrder                    not its shard's next step
    ├── InvalidRequest (ValueError)       a request with bad arguments
    ├── DuplicateUpdate                   an update id accepted before
    ├── StaleIncarnation                  a message from another server incarnation
    ├── ServerReplaced                    a message naming a server or run not served here
    ├── RunInUse                          another live train() trains that run (or server)
    ├── SpecMismatch (ValueError)         a model/optimizer/mode other than the store's
    ├── ModelError (ValueError)           a model that misbehaves or cannot be rebuilt
    │   └── ModelNotAllowed               a store names a module not in ftps.models.allowed
    ├── NotRegistered (RuntimeError)      no ParameterServer on the scheduler
    ├── SchedulerLost (ConnectionError)   train() lost its scheduler: call it again
    ├── WaitTimeout (TimeoutError)        a pull waited too long for its round
    ├── ShardUnavailable                  a shard of a sharded server is not served now
    ├── NotDurable                        an update that could not be made durable
    │   └── Voided                        undone with an earlier batch: push it again
    ├── StoreLocked                       another live server writes the store
    │   └── Fenced                        this server was replaced: it writes no more
    └── StoreError
        ├── StoreFormatError (ValueError) not a dask_ftps store of this format
        └── StoreCorrupted                a stored object failed its checks
"""

from __future__ import annotations


class FTPSError(Exception):
    """Base class of every dask_ftps error."""


class InvalidUpdate(FTPSError, ValueError):
    """A pushed update is malformed: bad id, names, shape, dtype or values."""


class InvalidRequest(FTPSError, ValueError):
    """A request to the parameter server has bad arguments."""


class DuplicateUpdate(FTPSError):
    """An update id that the parameter server has already accepted."""


class OutOfOrder(InvalidUpdate):
    """An update that is not its shard's next step (its predecessor is missing).

    A shard with pushes in flight gets it when one of them was lost or refused:
    its task asks the server where the shard stands and goes on from there.
    """


class StaleIncarnation(FTPSError):
    """A message from an older (or another) parameter-server incarnation."""


class ServerReplaced(FTPSError):
    """A message names a server or run that the scheduler does not serve.

    Every push, pull and request of a run names the server it began on (the
    store's run id, or a memory-only server's own id) and the run's number: a
    message of a run whose server was replaced by another one (a fresh
    memory-only server, another store's) is refused before it changes anything,
    so that runs of different servers can never mix. ``train()`` raises it when
    its server was replaced while it trained.
    """


class RunInUse(FTPSError):
    """Another ``train()``, of a client still connected to the scheduler, is
    training the run (or the server) a request would take over.

    Two calls training at once would merge each other's updates into one model:
    the later one is refused before it sends any. Wait for the other to end,
    give another ``run_name`` (a new run on the same model needs the other's to
    end first), or use another scheduler.
    """


class SpecMismatch(FTPSError, ValueError):
    """A model, optimizer or run spec differs from the one the server holds."""


class ModelError(FTPSError, ValueError):
    """A model misbehaves (its parameters or gradients are not what it declares,
    or its code raised), or a model named by a description cannot be rebuilt.

    Raised on the worker before anything is pushed, or where the model is
    registered: the server's state is unchanged.
    """


class ModelNotAllowed(ModelError):
    """A store (or message) names a model whose module the operator has not
    allowed this process to import: ``ftps.models.allowed``.

    Attributes
    ----------
    module
        The module's name.
    """

    def __init__(self, message: str, module: str = "") -> None:
        super().__init__(message)
        self.module = module

    def __reduce__(self):
        return type(self), (str(self), self.module)


class NotRegistered(FTPSError, RuntimeError):
    """No :class:`~dask_ftps.ParameterServer` is registered on the scheduler."""


class SchedulerLost(FTPSError, ConnectionError):
    """The client lost its scheduler while :func:`~dask_ftps.train` ran.

    Nothing accepted is lost: call ``train()`` again, the same call, once a
    scheduler serves (a restarted one rebuilds the run from its store), and it
    resumes where the store says the run stands.
    """


class WaitTimeout(FTPSError, TimeoutError):
    """A pull waited longer than ``ftps.wait-timeout`` for its sync round or ssp bound."""


class ShardUnavailable(FTPSError):
    """A shard of a sharded parameter server is not served now (no worker with
    the ``ftps-server`` resource took it, or its server is being replaced)."""


class NotDurable(FTPSError):
    """An update was refused because it could not be written to the store.

    Nothing of it was applied: the server's state is as before the push.
    """


class Voided(NotDurable):
    """An update merged behind a batch that could not be made durable: undone
    with that batch, through no fault of its own. Pushing it again is safe."""


class StoreLocked(FTPSError):
    """Another live parameter server already writes this store."""


class Fenced(StoreLocked):
    """A newer incarnation took the store over: this server can write nothing more."""


class StoreError(FTPSError):
    """A problem with what a store holds."""


class StoreFormatError(StoreError, ValueError):
    """The store holds something that is not a dask_ftps run of this format."""


class StoreCorrupted(StoreError):
    """A stored object is missing, truncated or fails its checksum.

    Attributes
    ----------
    key
        The object (key in the store) that failed, when one is known.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key

    def __reduce__(self):
        return type(self), (str(self), self.key)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    text = " ".join(str(e).split())
    return text or type(e).__name__
