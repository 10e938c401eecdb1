"""A griffe extension for the docs build: Sphinx roles in docstrings to Markdown.

The package's numpydoc docstrings cross-reference with Sphinx roles
(``:class:`~dask_ftps.ParameterServer```), which mkdocstrings shows verbatim.
This rewrites each role before rendering: a name documented on the API page
becomes a link to it (mkdocs-autorefs), anything else inline code. A
``~`` keeps only the last component, as in Sphinx.
"""

from __future__ import annotations

import re

import griffe

_PUBLIC = (
    "ParameterServer",
    "train",
    "TrainResult",
    "FTPSClassifier",
    "get_model",
    "status",
    "records",
    "recover",
    "inspect",
    "SGD",
    "Adam",
    "UpdateKey",
    "FTPSError",
    "InvalidUpdate",
    "OutOfOrder",
    "InvalidRequest",
    "DuplicateUpdate",
    "StaleIncarnation",
    "SpecMismatch",
    "NotRegistered",
    "WaitTimeout",
    "NotDurable",
    "Voided",
    "StoreLocked",
    "Fenced",
    "StoreError",
    "StoreFormatError",
    "StoreCorrupted",
)

#: Objects documented on docs/api.md (``::: dask_ftps.<name>``), by short name.
DOCUMENTED = (
    {name: f"dask_ftps.{name}" for name in _PUBLIC}
    | {
        name: f"dask_ftps.models.{name}"
        for name in ("MLP", "SoftmaxRegression", "Model")
    }
    | {"Optimizer": "dask_ftps.optim.Optimizer"}
)

_ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|mod|attr|obj|exc|data|const):`([^`]+)`"
)


def _replace(match: re.Match[str]) -> str:
    target = match.group(1).strip()
    title = None
    if target.endswith(">") and "<" in target:  # :role:`title <target>`
        title, _, target = target[:-1].partition("<")
        title, target = title.strip(), target.strip()
    short = target.startswith("~")
    target = target.lstrip("~.")
    text = title or (target.rsplit(".", 1)[-1] if short else target)
    if target in DOCUMENTED.values():
        path = target
    else:
        path = DOCUMENTED.get(target) if "." not in target else None
    return f"[`{text}`][{path}]" if path else f"`{text}`"


def convert(text: str) -> str:
    """Rewrite the Sphinx roles in ``text``."""
    return _ROLE.sub(_replace, text)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
