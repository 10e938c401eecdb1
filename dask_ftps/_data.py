"""The one data loader of the command line: digits, or a ``.npz``, ``.csv``,
``.parquet`` or svmlight/libsvm file, checked, label-encoded, split and scaled.

An svmlight/libsvm file (``.svm``, ``.svmlight``, ``.libsvm``) is read into a
SciPy CSR matrix and stays sparse: it is split on sparse rows and never
centred, so that a file of 2**20 hashed features never becomes dense.

Every problem with the data raises :class:`DataError` with a one-line message
that names the file and what to change.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np

from dask_ftps._exceptions import InvalidRequest, one_line
from dask_ftps._sparse import is_sparse

logger = logging.getLogger(__name__)

DIGITS = "digits"
#: Random state of the train/test split: every command splits a data set alike.
SPLIT_SEED = 0
#: Suffixes of the svmlight/libsvm files :func:`load` reads (sparse, "label
#: index:value ..." lines).
SVMLIGHT_SUFFIXES = (".svm", ".svmlight", ".libsvm")
#: What :func:`_kind` calls every svmlight/libsvm file.
SVMLIGHT = "svmlight"
#: Suffixes :func:`load` reads (a ``.csv`` may also be compressed, e.g. ``.csv.gz``;
#: an svmlight file with ``.gz``, ``.bz2`` or ``.xz``).
SUFFIXES = (".npz", ".csv", ".parquet", *SVMLIGHT_SUFFIXES)
_COMPRESSION = (".gz", ".bz2", ".xz", ".zip", ".zst")
_SVMLIGHT_COMPRESSION = (".gz", ".bz2", ".xz")
#: scikit-learn's svmlight reader holds feature indices as C ints.
_MAX_INDEX = 2**31 - 1
_SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1))


class DataError(InvalidRequest):
    """The data cannot be trained on; the message is one line that says why."""


@dataclass(frozen=True)
class Dataset:
    """A classification data set ready for :func:`dask_ftps.train`.

    Attributes
    ----------
    X_train, X_test
        float32 features, (n, n_features): NumPy arrays, or SciPy CSR matrices for
        an svmlight file; ``X_test`` has no rows without a test split.
    y_train, y_test
        int64 class codes in ``[0, n_classes)``.
    classes
        The original label of each code: ``classes[code]``.
    features
        The feature (column) names; empty for an svmlight file, whose features
        are its column indices (``zero_based`` says how the file numbers them).
    target
        The name of the label column (``"y"`` for a ``.npz``, ``"digit"``,
        ``"label"`` for an svmlight file).
    source
        The file read, or ``"digits"``.
    mean, scale
        The :class:`~sklearn.preprocessing.StandardScaler` applied to the
        features (fit on the training rows), or None when unscaled. For an
        svmlight file ``mean`` is None and ``scale`` is each column's largest
        absolute value on the training rows (1 where the column is all zero),
        which the features were divided by, or None when unscaled.
    n_original
        Training rows before the shifted copies of :func:`load`'s ``shifted``
        were added: ``X_train[:n_original]`` are the original rows.
    zero_based
        An svmlight file: whether its feature indices start at 0 (index ``i`` is
        column ``i``) or at 1 (index ``i`` is column ``i - 1``); None otherwise.
    """

    X_train: Any
    X_test: Any
    y_train: np.ndarray
    y_test: np.ndarray
    classes: np.ndarray
    features: tuple[str, ...]
    target: str
    source: str
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    n_original: int = 0
    zero_based: bool | None = None

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def n_train(self) -> int:
        """Training rows (``len()`` is ambiguous for a SciPy sparse matrix)."""
        return self.X_train.shape[0]

    @property
    def n_test(self) -> int:
        """Test rows; 0 without a test split."""
        return self.X_test.shape[0]

    @property
    def sparse(self) -> bool:
        """Whether the features are a SciPy sparse matrix (an svmlight file)."""
        return is_sparse(self.X_train)

    @property
    def split(self) -> tuple[Any, Any, np.ndarray, np.ndarray]:
        """``(X_train, X_test, y_train, y_test)``."""
        return self.X_train, self.X_test, self.y_train, self.y_test

    def labels(self) -> list[Any]:
        """The original labels as JSON-ready Python values, in code order."""
        return [_plain(v) for v in self.classes]

    def describe(self) -> str:
        """One line: where the data came from and its shape."""
        test = f" / {self.n_test} test" if self.n_test else " (no test split)"
        shifted = (
            f" ({self.n_original} images + {self.n_train - self.n_original} "
            "shifted copies)"
            if self.n_original < self.n_train
            else ""
        )
        if self.mean is not None:
            scaled = "standardised"
        elif self.scale is not None:
            scaled = "max-abs scaled"
        else:
            scaled = "unscaled"
        source = self.source
        if self.sparse:
            rows = self.n_train + self.n_test
            per_row = (self.X_train.nnz + self.X_test.nnz) / max(rows, 1)
            base = "zero" if self.zero_based else "one"
            source = f"{source} (svmlight, {base}-based indices)"
            scaled = f"sparse: {per_row:.1f} nonzero per sample, {scaled}"
        return (
            f"{source}: {self.n_train} train{shifted}{test} samples, "
            f"{self.n_features} features ({scaled}), {self.n_classes} classes "
            f"of {self.target!r}"
        )


def load(
    path: str | Path | None = None,
    *,
    target: str | None = None,
    test_size: float = 0.25,
    scale: bool = True,
    shifted: bool = False,
    n_features: int | None = None,
) -> Dataset:
    """Load, check, encode, split and scale a classification data set.

    Parameters
    ----------
    path
        A ``.npz`` file with arrays ``X`` (n, n_features) and ``y`` (n,), a
        ``.csv`` / ``.parquet`` table, or an svmlight/libsvm file (``.svm``,
        ``.svmlight``, ``.libsvm``, each also ``.gz``, ``.bz2`` or ``.xz``
        compressed; read into memory once by :func:`read_svmlight`, and kept
        sparse); default: scikit-learn's bundled digits (8x8 images, pixels
        scaled to [0, 1]).
    target
        The label column of a table; default: its last column. The other
        columns are the features, and must be numeric.
    test_size
        Share of the samples held out for testing (a stratified split with
        random state :data:`SPLIT_SEED`); 0: no test split.
    scale
        Standardise the features (zero mean, unit variance) with a
        :class:`~sklearn.preprocessing.StandardScaler` fit on the training rows.
        An svmlight file's sparse features are not centred (that would make them
        dense): each column is divided by its largest absolute value on the
        training rows instead (what scikit-learn's
        :class:`~sklearn.preprocessing.MaxAbsScaler` does), so zeros stay zero,
        every value lies in [-1, 1], and a column of counts in the thousands
        weighs no more than one of 0/1 flags. Rows that are already normalised
        (tf-idf) may be better left as they are: ``scale=False``.
    shifted
        Digits only: add four copies of every training image shifted by one
        pixel (up, down, left, right), for five times the training rows.
    n_features
        An svmlight file only: the number of features (columns), at least the
        file's highest feature index (plus one if its indices start at 0);
        default: that index. It makes a file that lacks the highest features
        match a model of more (another file's).

    Returns
    -------
    Dataset
        Labels of any type (strings too) are encoded with scikit-learn's
        :class:`~sklearn.preprocessing.LabelEncoder`: ``classes`` maps them back.
        Whole float labels become exact integers (int64, or Python ints beyond it).

    Raises
    ------
    DataError
        If the file is missing, unreadable or malformed, the target is not a
        column, a feature is not numeric or holds NaN/infinite values, a label
        cannot be held exactly (distinct labels are never merged), or there are
        too few samples or classes; or if an svmlight file holds a line that is
        not ``label index:value ...`` (the message names it), a multi-label
        line, or more features than ``n_features``.
    """
    if not 0 <= test_size < 1:
        raise DataError(f"the test size must be in [0, 1), got {test_size}")
    if path is not None and _path_kind(path) == SVMLIGHT:
        if target is not None:
            raise DataError(
                f"{path}: the labels of an svmlight file are the first value of "
                "each line; a target column applies to .csv and .parquet files"
            )
        if shifted:
            raise DataError("shifted copies are made of the digits images only")
        return _load_svmlight(Path(path), test_size, scale, n_features)
    if n_features is not None:
        raise DataError(
            "the number of features (--n-features) applies to an svmlight/libsvm "
            f"file ({', '.join(SVMLIGHT_SUFFIXES)}) only"
        )
    if path is None:
        if target is not None:
            raise DataError("a target column applies to a .csv or .parquet file")
        X, y, features, target_name, source = *_digits(), DIGITS
    else:
        if shifted:
            raise DataError("shifted copies are made of the digits images only")
        X, y, features, target_name = read_file(path, target=target)
        source = str(path)
    _check_features(X, features, source)
    codes, classes = _encode(y, target_name, source)
    X_train, X_test, y_train, y_test = _split(X, codes, test_size, source)
    n_original = len(X_train)
    if shifted:
        X_train, y_train = _shift_images(X_train, y_train)
    mean = std = None
    if scale:
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(X_train)
        mean, std = scaler.mean_, scaler.scale_
        X_train = scaler.transform(X_train)
        if len(X_test):
            X_test = scaler.transform(X_test)
    X_train, X_test = (_float32(a, source) for a in (X_train, X_test))
    return Dataset(
        X_train=X_train,
        X_test=X_test,
        y_train=y_train.astype(np.int64),
        y_test=y_test.astype(np.int64),
        classes=classes,
        features=tuple(features),
        target=target_name,
        source=source,
        mean=mean,
        scale=std,
        n_original=n_original,
    )


# -- reading -----------------------------------------------------------------------


def read_file(
    path: str | Path, *, target: str | None = None
) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """Read ``path``: ``(X, y, feature names, target name)``, unchecked values.

    Raises
    ------
    DataError
        If the file is missing, unreadable, of another type or malformed.
    """
    path = Path(path)
    kind = _path_kind(path)
    if kind == SVMLIGHT:
        raise DataError(f"{path}: an svmlight file is read, sparse, by load()")
    if kind == ".npz":
        if target is not None:
            raise DataError(
                f"{path}: a .npz file holds arrays X and y; a target column "
                "applies to .csv and .parquet files"
            )
        return _read_npz(path)
    frame = _read_table(path, kind)
    X, y, features, target = _split_columns(frame, target, path)
    if kind == ".csv" and y.dtype.kind == "f":
        _check_exact_text(path, list(frame.columns).index(target), y, target)
    return X, y, features, target


def _path_kind(path: str | Path) -> str:
    """The kind of file ``path`` is, once it is checked to be a file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path} is a folder: give a {', '.join(SUFFIXES)} file")
    return _kind(path)


def _kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        compression, suffixes = suffixes[-1], suffixes[:-1]
        if suffixes and suffixes[-1] == ".csv":
            return ".csv"
        if suffixes and suffixes[-1] in SVMLIGHT_SUFFIXES:
            if compression not in _SVMLIGHT_COMPRESSION:
                raise DataError(
                    f"{path}: an svmlight file may be compressed with "
                    f"{', '.join(_SVMLIGHT_COMPRESSION)}, not {compression}"
                )
            return SVMLIGHT
    if suffixes and suffixes[-1] in SVMLIGHT_SUFFIXES:
        return SVMLIGHT
    if suffixes and suffixes[-1] in SUFFIXES:
        return suffixes[-1]
    raise DataError(
        f"{path}: unknown data file type {''.join(path.suffixes) or '(no suffix)'!r}: "
        f"give a .npz (arrays X and y), .csv, .parquet or svmlight/libsvm "
        f"({', '.join(SVMLIGHT_SUFFIXES)}) file"
    )


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            missing = [k for k in ("X", "y") if k not in names]
            if missing:
                held = ", ".join(sorted(names)) or "nothing"
                raise DataError(
                    f"{path} holds {held}; it needs the arrays X (samples x "
                    "features) and y (labels)"
                )
            X, y = npz["X"], npz["y"]
    except DataError:
        raise
    except Exception as e:  # any failure to read is the file's
        raise DataError(f"cannot read {path} as a .npz file: {one_line(e)}") from e
    if X.ndim != 2:
        raise DataError(
            f"{path}: X must be 2-D (samples x features), got shape {X.shape}"
        )
    if y.ndim != 1:
        raise DataError(f"{path}: y must be 1-D (one label per sample), got {y.shape}")
    if len(X) != len(y):
        raise DataError(f"{path}: X has {len(X)} rows but y has {len(y)} labels")
    if X.dtype.kind not in "biuf":
        raise DataError(
            f"{path}: X must hold numbers, not {X.dtype}: encode the features first"
        )
    return X, y, [f"x{i}" for i in range(X.shape[1])], "y"


def _read_table(path: Path, kind: str):
    try:
        import pandas as pd
    except ImportError:
        raise DataError(
            f"reading {kind} files needs pandas: pip install pandas"
        ) from None
    try:
        if kind == ".csv":
            return pd.read_csv(path, **_float_parsing(pd))
        return pd.read_parquet(path)
    except ImportError:
        raise DataError(
            "reading .parquet files needs pyarrow: pip install pyarrow"
        ) from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty") from None
    except Exception as e:  # any failure to parse is the file's
        what = "CSV" if kind == ".csv" else "Parquet"
        raise DataError(f"cannot read {path} as {what}: {one_line(e)}") from e


def _float_parsing(pd) -> dict[str, str]:
    """``read_csv``'s options that parse each number to the float64 nearest it.

    Before pandas 3.1 the C parser's default converter is not correctly rounded
    (``987901288843104896.0``, a float64 exactly, reads as the next float64,
    ``987901288843105024``): ``float_precision="round_trip"`` parses as Python's
    :func:`float` does. From 3.1 every converter is the correctly rounded one and
    the option is deprecated.
    """
    try:
        major, minor = (int(part) for part in pd.__version__.split(".")[:2])
    except ValueError:  # an unusual version string: keep the option
        return {"float_precision": "round_trip"}
    return {} if (major, minor) >= (3, 1) else {"float_precision": "round_trip"}


def _split_columns(frame, target: str | None, path: Path):
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    if not columns or len(frame) == 0:
        raise DataError(f"{path} holds no data rows")
    if target is None:
        target = columns[-1]
    elif target not in columns:
        raise DataError(
            f"{path} has no column {target!r}; its columns: {_names(columns)}"
        )
    features = [c for c in columns if c != target]
    if not features:
        raise DataError(f"{path} has no feature columns besides the target {target!r}")
    bad = [
        f"{c!r} ({frame[c].dtype})"
        for c in features
        if frame[c].dtype.kind not in "biuf"
    ]
    if bad:
        raise DataError(
            f"{path}: features must be numeric; non-numeric columns: {_names(bad)} "
            f"(encode or drop them; the label column is {target!r}, --target picks "
            "another)"
        )
    labels = frame[target]
    missing = int(labels.isna().sum())
    if missing:
        raise DataError(
            f"{path}: the target column {target!r} has {missing} missing values: "
            "drop those rows first"
        )
    X = frame[features].to_numpy(dtype=np.float64, na_value=np.nan)
    return X, labels.to_numpy(), features, target


def _check_exact_text(path: Path, column: int, y: np.ndarray, target: str) -> None:
    """Refuse a CSV label that parsed as a whole float64 different from its text.

    A label column with one decimal point or exponent is parsed as float64, which
    rounds integers beyond 2**53 (``9007199254740993`` reads as ``...992``) and texts
    such as ``2.0000000000000001``: two labels could become one class. Every
    label whose parsed value is a whole number must equal its text exactly;
    labels that parse to fractions are left to :func:`_encode`, which refuses them.
    Each text is compared with the value parsed from it in its own row (``y``),
    so a parser that rounds a text other than :func:`float` does is caught too.

    Parameters
    ----------
    path
        The CSV file, read again for the label column's text.
    column
        The position of the label column.
    y
        The labels as parsed (float64, one per row).
    target
        The label column's name, for the message.

    Raises
    ------
    DataError
        If a label's text is not exactly the whole number it was parsed as.
    """
    import pandas as pd

    finite = y[np.isfinite(y)]
    if not np.array_equal(finite, np.round(finite)):
        return  # fractions: _encode refuses them with a message of their own
    try:
        texts = pd.read_csv(
            path, usecols=[column], dtype=str, keep_default_na=False
        ).iloc[:, 0]
    except Exception as e:  # read once already: a failure now is the file's
        raise DataError(f"cannot read {path} as CSV: {one_line(e)}") from e
    if len(texts) != len(y):  # both reads skip the same lines: never expected
        raise DataError(
            f"{path}: the label column {target!r} read as {len(y)} values but "
            f"{len(texts)} texts: cannot check that each label is read exactly"
        )
    for text, value in dict.fromkeys(zip(texts.tolist(), y.tolist(), strict=True)):
        try:
            exact = Decimal(text.strip())
        except InvalidOperation:
            logger.debug("%s: label text %r not checked for exactness", path, text)
            continue
        if exact.is_finite() and exact != Decimal(value):
            raise DataError(
                f"{path}: the label {text.strip()!r} of {target!r} cannot be held "
                f"exactly as a number (it reads as {value:.17g}), so labels could be "
                "merged: write whole-number labels without a decimal point or "
                "exponent, or use names"
            )


# -- svmlight / libsvm ---------------------------------------------------------------


def _load_svmlight(
    path: Path, test_size: float, scale: bool, n_features: int | None
) -> Dataset:
    """:func:`load` of an svmlight file: read, check, encode, split on sparse rows,
    max-abs scale, as float32 CSR matrices."""
    X, y, zero_based = read_svmlight(path, n_features=n_features)
    source = str(path)
    if np.isfinite(y).all() and len(y) and np.abs(y).max() >= 2**53:
        raise DataError(
            f"{path}: labels of magnitude 2**53 or more, such as "
            f"{y[np.argmax(np.abs(y))]:.17g}, "
            "cannot be told apart in an svmlight file (its labels are read as "
            "float64): number the classes 0, 1, ..."
        )
    codes, classes = _encode(y, "label", source, hint="give class labels")
    del y
    X_train, X_test, y_train, y_test = _split(X, codes, test_size, source)
    del X  # the rows are in X_train and X_test (or X_train is X)
    max_abs = None
    if scale:
        max_abs = _max_abs(X_train)
        for part in (X_train, X_test):
            part.data /= max_abs[part.indices]
    X_train, X_test = (_sparse_float32(a, source) for a in (X_train, X_test))
    return Dataset(
        X_train=X_train,
        X_test=X_test,
        y_train=y_train.astype(np.int64),
        y_test=y_test.astype(np.int64),
        classes=classes,
        features=(),
        target="label",
        source=source,
        scale=max_abs,
        n_original=X_train.shape[0],
        zero_based=zero_based,
    )


def read_svmlight(
    path: str | Path, *, n_features: int | None = None
) -> tuple[Any, np.ndarray, bool]:
    """Read an svmlight/libsvm file: ``(X, y, zero_based)``, X checked, y not.

    Each line is ``label index:value index:value ...`` with increasing indices,
    a ``# comment`` after it if any; a ``qid:N`` first pair is ignored. The file
    (``.gz``, ``.bz2`` and ``.xz`` ones decompressed as they are read) is read
    once, into memory, by scikit-learn's
    :func:`~sklearn.datasets.load_svmlight_file`: a float64 CSR matrix of about
    12 bytes per stored value (16 while it is read); :func:`load` then splits it
    into two (a copy, so about twice that at the peak) and casts them to
    float32. A file that does not fit in memory twice over must be cut first.

    Indices are zero-based if the file holds an index 0 anywhere, one-based
    otherwise (scikit-learn's ``zero_based="auto"``): LIBSVM's own files start
    at 1, :func:`~sklearn.datasets.dump_svmlight_file` writes from 0 by default.
    A zero-based file that never uses feature 0 is thus read as one-based, all
    its columns one to the left: a model trained on it is right for files read
    the same way (``zero_based`` says which way it was).

    Parameters
    ----------
    path
        The file.
    n_features
        The number of columns of ``X``; default: as many as the highest index
        needs.

    Returns
    -------
    X : scipy.sparse.csr_matrix of float64, shape (n_samples, n_features)
        Explicit zeros dropped; int32 indices where they fit.
    y : ndarray of float64
        The labels as written (a multi-label line is refused).
    zero_based : bool
        Whether the file's indices were read as starting at 0.

    Raises
    ------
    DataError
        If the file is missing, unreadable, empty, holds a line that is not
        ``label index:value ...`` (the message names the line), a multi-label
        line (``1,2 3:1``, not supported), NaN or infinite values, or more
        features than ``n_features``.
    """
    import scipy.sparse as sp
    from sklearn.datasets import load_svmlight_file

    path = Path(path)
    if _path_kind(path) != SVMLIGHT:
        raise DataError(
            f"{path}: not an svmlight file: give a {', '.join(SVMLIGHT_SUFFIXES)} file"
        )
    if n_features is not None and n_features < 1:
        raise DataError(f"the number of features must be positive, got {n_features}")
    try:
        with _open_svmlight(path) as f:
            # Indices as written: "auto" is decided below, to say which it was.
            X, y = load_svmlight_file(f, dtype=np.float64, zero_based=True)
    except Exception as e:  # any failure to parse is the file's
        raise _svmlight_error(path, e) from e
    if X.shape[0] == 0:
        raise DataError(
            f"{path} is empty: it holds no lines of the form 'label index:value ...'"
        )
    if X.nnz == 0:
        raise DataError(
            f"{path} holds no feature values: each of its {X.shape[0]} lines is a "
            "label alone"
        )
    zero_based = bool(X.indices.min() == 0)
    shift = 0 if zero_based else 1
    highest = int(X.indices.max())
    needed = highest + 1 - shift
    if n_features is None:
        n_features = needed
    elif n_features < needed:
        raise DataError(
            f"{path} has feature indices up to {highest} ({'zero' if zero_based else 'one'}"
            f"-based: {needed} features), more than the {n_features} features given "
            "(--n-features)"
        )
    index = np.int32 if max(X.nnz, n_features) <= _MAX_INDEX else np.int64
    indices = X.indices.astype(index)
    if shift:
        indices -= shift
    X = sp.csr_matrix(
        (X.data, indices, X.indptr.astype(index)), shape=(X.shape[0], n_features)
    )
    X.eliminate_zeros()
    _check_sparse_values(X, path, shift)
    return X, y, zero_based


def _open_svmlight(path: Path):
    """``path`` opened for reading bytes, decompressed by its suffix."""
    compression = path.suffix.lower()
    if compression == ".gz":
        import gzip

        return gzip.open(path, "rb")
    if compression == ".bz2":
        import bz2

        return bz2.open(path, "rb")
    if compression == ".xz":
        import lzma

        return lzma.open(path, "rb")
    return open(path, "rb")


def _svmlight_error(path: Path, e: Exception) -> DataError:
    """What scikit-learn's reader refused, as one line that names the line of
    ``path`` at fault where it can be found (scikit-learn does not say)."""
    if isinstance(e, ValueError | OverflowError):
        try:
            where = _bad_line(path)
        except Exception:  # the error says enough
            logger.debug("%s: no bad line found", path, exc_info=True)
            where = None
        if where is not None:
            return DataError(f"{path}: {where}")
    return DataError(f"cannot read {path} as svmlight/libsvm: {one_line(e)}")


def _bad_line(path: Path) -> str | None:
    """The first line of ``path`` scikit-learn's svmlight reader refuses, and why;
    None if none is found. Read only after the reader failed."""
    for number, raw in enumerate(_lines(path), start=1):
        tokens = raw.split(b"#", 1)[0].split()
        if not tokens:
            continue
        label, pairs = tokens[0], tokens[1:]
        text = _text(label)
        if b"," in label:
            return (
                f"line {number}: multi-label line (labels {text!r}): multi-label "
                "data is not supported, give each line one label"
            )
        try:
            float(label)
        except ValueError:
            return (
                f"line {number}: the label {text!r} is not a number (each line is "
                "'label index:value ...')"
            )
        if pairs and pairs[0].startswith(b"qid"):
            pairs = pairs[1:]
        previous = -1
        for pair in pairs:
            index, colon, value = pair.partition(b":")
            try:
                i = int(index) if colon else None
                float(value)
            except ValueError:
                i = None
            if i is None:
                return (
                    f"line {number}: {_text(pair)!r} is not index:value (an integer "
                    "index, a number)"
                )
            if not 0 <= i <= _MAX_INDEX:
                return f"line {number}: the feature index {i} is not in [0, 2**31)"
            if i <= previous:
                return (
                    f"line {number}: the feature index {i} follows {previous}: "
                    "indices must increase along a line (sorted, each once)"
                )
            previous = i
    return None


def _lines(path: Path):
    with _open_svmlight(path) as f:
        yield from f


def _text(token: bytes, most: int = 40) -> str:
    text = token.decode("utf-8", errors="replace")
    return text if len(text) <= most else f"{text[:most]}..."


def _line_of(path: Path, row: int) -> int:
    """The line number of ``path`` that holds data row ``row`` (0-based): blank
    and comment lines are no rows."""
    seen = -1
    for number, raw in enumerate(_lines(path), start=1):
        if raw.split(b"#", 1)[0].split():
            seen += 1
            if seen == row:
                return number
    raise ValueError(f"{path} has no row {row}")  # never: the row was read from it


def _check_sparse_values(X: Any, path: Path, shift: int) -> None:
    bad = ~np.isfinite(X.data)
    if not bad.any():
        return
    first = int(np.flatnonzero(bad)[0])
    row = int(np.searchsorted(X.indptr, first, side="right")) - 1
    try:
        where = f"line {_line_of(path, row)}"
    except (OSError, EOFError, ValueError):  # read once already: never expected
        where = f"sample {row}"
    raise DataError(
        f"{path}: {int(bad.sum())} NaN or infinite feature values, the first on "
        f"{where} (feature index {int(X.indices[first]) + shift}): impute or drop "
        "them first"
    )


def _max_abs(X: Any) -> np.ndarray:
    """Each column's largest absolute value in CSR ``X`` (1 for a column all zero)."""
    peak = np.zeros(X.shape[1])
    np.maximum.at(peak, X.indices, np.abs(X.data))
    peak[peak == 0] = 1.0
    return peak


def _sparse_float32(X: Any, source: str) -> Any:
    out = X.astype(np.float32)
    if not np.isfinite(out.data).all():
        raise DataError(
            f"{source}: feature values too large for float32 (over 3.4e38): rescale "
            "them first (or leave scaling on)"
        )
    return out


# -- checks, encoding, split -------------------------------------------------------


def _check_features(X: np.ndarray, features: list[str], source: str) -> None:
    X = np.asarray(X, dtype=np.float64)
    if X.shape[1] == 0:
        raise DataError(f"{source}: X has no features")
    bad = ~np.isfinite(X)
    if bad.any():
        counts = bad.sum(axis=0)
        where = [f"{features[i]} ({counts[i]})" for i in np.flatnonzero(counts)]
        raise DataError(
            f"{source}: {int(bad.sum())} missing (NaN) or infinite feature values, "
            f"in {_names(where)}: impute or drop them first"
        )


def _encode(
    y: np.ndarray,
    target: str,
    source: str,
    hint: str = "--target picks another column",
) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.preprocessing import LabelEncoder

    y = np.asarray(y)
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise DataError(
                f"{source}: the labels {target!r} hold NaN or infinite values: drop "
                "those rows first"
            )
        if not np.array_equal(y, np.round(y)):
            example = y[np.flatnonzero(y != np.round(y))[0]]
            raise DataError(
                f"{source}: the labels {target!r} hold non-integer numbers such as "
                f"{example:g}: a classifier needs class labels (is it a regression "
                f"target? {hint})"
            )
    try:
        encoder = LabelEncoder().fit(y)
    except TypeError as e:
        raise DataError(
            f"{source}: the labels {target!r} mix types ({one_line(e)}): make "
            "them all strings or all numbers"
        ) from e
    classes = encoder.classes_
    if y.dtype.kind == "f":
        classes = _whole(classes)
    if len(classes) < 2:
        only = f" ({_plain(classes[0])!r})" if len(classes) else ""
        raise DataError(
            f"{source}: the labels {target!r} hold a single class{only}: a classifier "
            "needs at least 2"
        )
    return encoder.transform(y), classes


def _whole(values: np.ndarray) -> np.ndarray:
    """Distinct whole floats as distinct integers: int64, else exact Python ints.

    Casting a float beyond int64 to int64 is undefined (``1e19`` and ``2e19`` both
    became ``-2**63``, one class); every whole float is an exact integer.
    """
    if len(values) and -(2**63) <= int(values.min()) and int(values.max()) < 2**63:
        return values.astype(np.int64)
    return np.array([int(v) for v in values], dtype=object)


def _split(X: np.ndarray, y: np.ndarray, test_size: float, source: str):
    n, k = len(y), int(y.max()) + 1
    if test_size == 0:
        return X, X[:0], y, y[:0]
    n_test = math.ceil(test_size * n)  # scikit-learn's rounding
    counts = np.bincount(y)
    if n - n_test < k or n_test < k or counts.min() < 2:
        raise DataError(
            f"{source}: too few samples for a stratified {test_size:g} test split: "
            f"{n} samples, {k} classes, the rarest has {counts.min()} (each class "
            "needs 2, and each side one per class); give more data, another "
            "--test-size, or --test-size 0"
        )
    from sklearn.model_selection import train_test_split

    return train_test_split(
        X, y, test_size=test_size, random_state=SPLIT_SEED, stratify=y
    )


def _shift_images(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``X`` (8x8 images as rows) and four copies shifted by one pixel, blanks filled."""
    side = math.isqrt(X.shape[1])
    images = X.reshape(-1, side, side)
    copies = [images]
    for dy, dx in _SHIFTS:
        shifted = np.zeros_like(images)
        rows = slice(max(dy, 0), side + min(dy, 0))
        cols = slice(max(dx, 0), side + min(dx, 0))
        src_rows = slice(max(-dy, 0), side + min(-dy, 0))
        src_cols = slice(max(-dx, 0), side + min(-dx, 0))
        shifted[:, rows, cols] = images[:, src_rows, src_cols]
        copies.append(shifted)
    return np.concatenate(copies).reshape(-1, side * side), np.tile(y, len(copies))


def _float32(X: np.ndarray, source: str) -> np.ndarray:
    out = np.asarray(X, dtype=np.float32)
    if not np.isfinite(out).all():
        raise DataError(
            f"{source}: feature values too large for float32 (over 3.4e38): rescale "
            "them first"
        )
    return out


def _digits() -> tuple[np.ndarray, np.ndarray, list[str], str]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data / 16, data.target, list(data.feature_names), "digit"


# -- text ---------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A NumPy scalar as a plain Python (JSON-ready) value."""
    return value.item() if isinstance(value, np.generic) else value


def _names(items: list[str], most: int = 8) -> str:
    shown = ", ".join(items[:most])
    return shown if len(items) <= most else f"{shown}, ... ({len(items)} in all)"


# -- a wide sparse data set --------------------------------------------------------


def sparse_text(
    n_samples: int = 20_000,
    n_features: int = 1 << 20,
    n_classes: int = 10,
    nnz: int = 100,
    *,
    zipf: float = 1.1,
    noise: float = 0.5,
    informative: int = 1 << 12,
    seed: int = 0,
) -> tuple[Any, np.ndarray]:
    """A wide sparse classification set shaped like hashed text or click logs.

    Each sample holds about ``nnz`` distinct features, drawn with power-law
    frequencies (feature of rank ``r`` with probability proportional to
    ``(r + 1) ** -zipf``; the ranks are shuffled over the feature ids, as a
    hash spreads them), each of value 1 (one-hot, as hashed categorical data
    and click logs are; fewer where a draw repeats a feature). The label
    is the planted rule ``argmax(X @ W + noise * e)`` for a fixed random
    ``W`` of shape ``(n_features, n_classes)``, standard normal on the
    features of ranks 16 to ``informative - 1`` and zero elsewhere, and
    standard normal ``e``: a linear model can learn it, up to the noise (the
    fewer informative features, the fewer samples it takes).

    Returns
    -------
    X : scipy.sparse.csr_matrix of float32, shape (n_samples, n_features)
    y : ndarray of int64, shape (n_samples,)

    Examples
    --------
    >>> X, y = sparse_text(100, 1 << 12, 3, 20)
    >>> X.shape, X.dtype, sorted(set(y.tolist())) == [0, 1, 2]
    ((100, 4096), dtype('float32'), True)
    """
    import scipy.sparse as sp

    if not (n_samples >= 1 and n_features >= 2 and n_classes >= 2 and nnz >= 1):
        raise ValueError(
            "sparse_text needs n_samples, nnz >= 1 and 2+ features, classes"
        )
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(np.arange(1, n_features + 1, dtype=np.float64) ** -zipf)
    cdf /= cdf[-1]
    ids = rng.permutation(n_features).astype(np.int32)  # rank -> feature id
    draws = np.searchsorted(cdf, rng.random(n_samples * nnz), side="right")
    cols = ids[np.minimum(draws, n_features - 1)].reshape(n_samples, nnz)
    rows = np.repeat(np.arange(n_samples), nnz)
    X = sp.csr_matrix(
        (np.ones(n_samples * nnz, np.float32), (rows, cols.ravel())),
        shape=(n_samples, n_features),
    )
    X.sum_duplicates()
    X.data[:] = 1.0  # a feature present once or more: 1 (one-hot, as click logs)
    # The rule reads the features of ranks [16, informative): not the few that
    # almost every sample holds (they would pick one class for most), not the
    # long tail (seen too seldom to learn).
    informative = min(n_features, informative)
    W = np.zeros((n_features, n_classes))
    W[ids[16:informative]] = np.random.default_rng([seed, 1]).standard_normal(
        (informative - min(16, informative), n_classes)
    )
    scores = np.asarray(X @ W) + noise * rng.standard_normal((n_samples, n_classes))
    return X, scores.argmax(axis=1).astype(np.int64)
