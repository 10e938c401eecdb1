"""Specs named by kind: the one way models and optimizers are described and rebuilt.

A spec (a :class:`~dask_ftps.models.Model` or an
:class:`~dask_ftps.optim.Optimizer`) is a frozen dataclass of hyper-parameters.
It is described as ``{"kind": ..., <field>: <value>, ...}``: the store keeps that
description, and a restarted scheduler rebuilds the spec from it.

``kind`` is the class's short name for the classes dask_ftps ships (``"MLP"``,
``"SGD"``), and its import path ``"module:QualName"`` for any other class.
Rebuilding a spec from an import path runs code named by stored data, so a
module is imported only where the operator allows it (``ftps.models.allowed``);
a class this process already defined (the user's own, shipped to the scheduler
with the ``ParameterServer``) is used as it is, and no module is imported.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import sys
from dataclasses import fields
from typing import Any, Generic, TypeVar

from dask_ftps import config
from dask_ftps._exceptions import ModelError, ModelNotAllowed

T = TypeVar("T")

#: The environment variable that sets ``ftps.models.allowed`` (a JSON list).
MODELS_ALLOWED_ENV = "DASK_FTPS__MODELS__ALLOWED"

#: Modules a store may always name: dask_ftps's own models.
ALWAYS_ALLOWED = ("dask_ftps.models", "dask_ftps.models.*")


def import_path(cls: type) -> str:
    """``"module:QualName"`` of a class."""
    return f"{cls.__module__}:{cls.__qualname__}"


def importable_elsewhere(cls: type) -> str | None:
    """Why another process could not import ``cls`` by its path (None: it can,
    as far as can be told here)."""
    if cls.__module__ in ("__main__", "__mp_main__", "builtins"):
        return f"it is defined in {cls.__module__} (a script or notebook)"
    if "<locals>" in cls.__qualname__:
        return "it is defined inside a function"
    module = sys.modules.get(cls.__module__)
    if module is None or getattr(module, "__file__", None) is None:
        return f"its module {cls.__module__} is not a file on the import path"
    return None


def allowed_patterns() -> tuple[str, ...]:
    """``ftps.models.allowed``: module names or shell-style patterns."""
    value = config.get("models.allowed")
    if isinstance(value, str):  # "mymodels" from an environment variable
        value = [value]
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, str) for v in value
    ):
        raise ModelError(
            f"ftps.models.allowed must be a list of module names or patterns, got "
            f"{value!r}"
        )
    return (*ALWAYS_ALLOWED, *value)


def module_allowed(module: str) -> bool:
    """Whether ``ftps.models.allowed`` lets a store name ``module``: a name in it,
    a match of a pattern in it (``"lab.*"``), or a submodule of a name in it."""
    for pattern in allowed_patterns():
        if fnmatch.fnmatchcase(module, pattern) or module.startswith(pattern + "."):
            return True
    return False


class Registry(Generic[T]):
    """The kinds of one family of specs (models, or optimizers).

    Parameters
    ----------
    what
        The family's name in messages (``"model"``).
    imports
        Whether a kind may be an import path (models: yes; optimizers: only
        dask_ftps's own).
    """

    def __init__(self, what: str, *, imports: bool) -> None:
        self.what = what
        self.imports = imports
        self.builtins: dict[str, type[T]] = {}
        #: Classes defined in this process, by import path, oldest first (a
        #: notebook cell run again defines a second one).
        self.defined: dict[str, list[type[T]]] = {}

    def defines(self, cls: type[T]) -> None:
        """Note a class of the family as defined here (its base's
        ``__init_subclass__``), named by its import path until :meth:`builtin`
        names it otherwise."""
        cls.kind = import_path(cls)  # type: ignore[attr-defined]
        self.defined.setdefault(cls.kind, []).append(cls)  # type: ignore[attr-defined]

    def _defined(self, kind: str) -> type[T] | None:
        """The class this process has for ``kind``, if any: the one its module
        holds under that name, else the newest complete one defined.

        A class a pickle brings by value (one defined in ``__main__`` or a
        notebook) is first made as an empty skeleton, which cloudpickle throws
        away where the class already exists: a skeleton is never made a
        dataclass, and is never the one used.
        """
        classes = self.defined.get(kind, [])
        if not classes:  # nothing of the name here: look nothing up (no code runs)
            return None
        if len(classes) == 1:
            return classes[0]
        module_name, _, qualname = kind.partition(":")
        target: Any = sys.modules.get(module_name)
        for part in qualname.split("."):  # static: runs no __getattr__, no property
            target = inspect.getattr_static(target, part, None)
        if any(target is c for c in classes):
            return target
        complete = [c for c in classes if "__dataclass_fields__" in vars(c)]
        return complete[-1] if complete else classes[-1]

    def builtin(self, cls: type[T]) -> type[T]:
        """Register one of dask_ftps's classes under its short name."""
        self.builtins[cls.__name__] = cls
        cls.kind = cls.__name__  # type: ignore[attr-defined]
        return cls

    def describe(self, spec: Any) -> dict[str, Any]:
        """``{"kind": ..., field: value}`` of a spec; tuples become lists."""
        d: dict[str, Any] = {"kind": type(spec).kind}
        for f in fields(spec):
            v = getattr(spec, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    def resolve(self, kind: str) -> type[T]:
        """The class a description's ``kind`` names.

        Raises
        ------
        ModelNotAllowed
            For a module that ``ftps.models.allowed`` does not allow.
        ValueError
            For a kind that names nothing usable.
        """
        if not isinstance(kind, str):
            raise ValueError(  # noqa: TRY004 - a bad description, as any other
                f"{self.what} kind must be a string, got {kind!r:.80}"
            )
        if kind in self.builtins:
            return self.builtins[kind]
        if not self.imports or ":" not in kind:
            raise ValueError(
                f"unknown {self.what} kind {kind!r}; known: {sorted(self.builtins)}"
                + ("" if not self.imports else " or an import path 'module:Class'")
            )
        known = self._defined(kind)
        if known is not None:
            return known
        module_name, _, qualname = kind.partition(":")
        parts = module_name.split(".") + qualname.split(".")
        if not all(p.isidentifier() for p in parts):
            raise ValueError(f"{self.what} kind {kind!r:.120} is not an import path")
        if not module_allowed(module_name):
            raise ModelNotAllowed(
                f"the {self.what} {kind} is not allowed: its module {module_name!r} "
                "is not in ftps.models.allowed (set it, for example "
                f"DASK_FTPS__MODELS__ALLOWED='[\"{module_name}\"]', to let this "
                "process import it)",
                module_name,
            )
        try:
            importlib.import_module(module_name)
        except Exception as e:
            raise ModelError(
                f"the {self.what} {kind} cannot be rebuilt: importing {module_name!r} "
                f"failed ({type(e).__name__}: {e}); put the class in a module this "
                "process can import"
            ) from e
        known = self._defined(kind)  # the import defined it
        if known is not None:
            return known
        raise ModelError(
            f"the {self.what} {kind} cannot be rebuilt: module {module_name!r} has no "
            f"{self.what} class {qualname!r}"
        )

    def rebuild(self, d: Any) -> T:
        """The spec a :meth:`describe` output describes.

        Raises
        ------
        ModelNotAllowed
            For a module that ``ftps.models.allowed`` does not allow.
        ValueError
            For an unknown kind or bad fields.
        """
        if not isinstance(d, dict) or "kind" not in d:
            raise ValueError(f"expected a dict with a 'kind' key, got {d!r:.120}")
        kw = dict(d)
        kind = kw.pop("kind")
        cls = self.resolve(kind)
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        extra = set(kw) - names
        if extra:
            raise ValueError(f"unknown fields for {kind}: {sorted(extra)}")
        try:
            return cls(**kw)
        except TypeError as exc:
            raise ValueError(f"bad fields for {kind}: {exc}") from exc
