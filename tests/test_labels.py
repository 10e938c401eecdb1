"""Labels are never merged: every distinct label is its own class, or the data is
refused in one line.

A label column is read by :func:`dask_ftps._data.load` (the one loader of the
command line) from a real CSV, NPZ or Parquet file here; the command-line cases
run ``dask-ftps train`` itself.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_ftps import _data, cli


def _command() -> list[str]:
    script = Path(sys.executable).with_name("dask-ftps")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dask_ftps.cli"]


def _csv(folder: Path, texts: list[str]) -> Path:
    """A CSV with a feature ``a`` and the label column ``y`` holding ``texts``."""
    path = folder / "labels.csv"
    rows = "".join(f"{i},{text}\n" for i, text in enumerate(texts))
    path.write_text("a,y\n" + rows)
    return path


def _exact(label) -> Decimal:
    """A label's exact value (numbers, and texts that spell numbers)."""
    if isinstance(label, float | np.floating):
        return Decimal(float(label))
    return Decimal(str(label).strip())


def _classes_are_the_labels(data: _data.Dataset, values: list[Decimal]) -> None:
    """One class per distinct value, and each row's class is its own label."""
    assert data.n_classes == len(set(values)), (data.labels(), values)
    decoded = [_exact(data.classes[code]) for code in data.y_train]
    assert decoded == values
    assert len({_exact(label) for label in data.labels()}) == data.n_classes


# -- the reported cases, through the command --------------------------------------


def _unreachable() -> str:
    from distributed.utils import open_port

    return f"tcp://127.0.0.1:{open_port()}"  # nothing listens there


def test_labels_beyond_int64_are_four_classes_in_the_command(tmp_path) -> None:
    """``1e19, 2e19, 3, 4`` were cast to int64: both large ones became -2**63.

    The command prints the data and its labels before it connects, so an address
    where nothing listens shows them without a cluster.
    """
    path = _csv(tmp_path, ["1e19", "2e19", "3", "4"] * 2)
    result = CliRunner().invoke(
        cli.main,
        ["train", str(path), "--test-size", "0", "--scheduler", _unreachable(),
         "--connect-timeout", "1"],
    )  # fmt: skip
    assert "4 classes of 'y'" in result.output, result.output
    assert (
        "(code=label): 0=3, 1=4, 2=10000000000000000000, 3=20000000000000000000"
        in result.output
    ), result.output
    assert "-9223372036854775808" not in result.output


def test_labels_float64_rounds_together_are_refused_in_one_line(tmp_path) -> None:
    """``2**53, 2**53 + 1, 7.0, 8``: the ``7.0`` makes pandas parse the column as
    float64, in which ``2**53 + 1`` reads as ``2**53``: refused, not three classes."""
    path = _csv(tmp_path, ["9007199254740992", "9007199254740993", "7.0", "8"] * 2)
    proc = subprocess.run(
        [*_command(), "train", str(path), "--test-size", "0"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "the label '9007199254740993' of 'y' cannot be held exactly" in lines[0]
    assert "classes" not in proc.stdout  # refused before anything was trained


@pytest.mark.parametrize(
    "texts",
    [
        ["2", "2.0000000000000001", "3", "4"],  # a fraction that parses as a whole
        ["1e23", "2", "3"],  # 1e23 is 99999999999999991611392 as a float64
    ],
)
def test_a_label_float64_cannot_hold_is_refused(tmp_path, texts) -> None:
    path = _csv(tmp_path, texts)
    result = CliRunner().invoke(cli.main, ["train", str(path), "--test-size", "0"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot be held exactly" in lines[0], result.output


def test_whole_labels_without_a_fraction_stay_exact(tmp_path) -> None:
    """Without the ``7.0``, pandas reads the same labels as int64: four classes."""
    path = _csv(tmp_path, ["9007199254740992", "9007199254740993", "7", "8"])
    data = _data.load(path, test_size=0)
    assert data.labels() == [7, 8, 2**53, 2**53 + 1]


def test_parquet_and_npz_float_labels_beyond_int64(tmp_path) -> None:
    import pandas as pd

    y = np.array([1e19, 2e19, 3.0, 4.0, -1e19, 2.0**63])
    X = np.arange(len(y), dtype=np.float64)[:, None]
    pd.DataFrame({"a": X[:, 0], "y": y}).to_parquet(tmp_path / "d.parquet")
    np.savez(tmp_path / "d.npz", X=X, y=y)
    expected = sorted(int(v) for v in y)
    for name in ("d.parquet", "d.npz"):
        data = _data.load(tmp_path / name, test_size=0)
        assert data.labels() == expected, name
        _classes_are_the_labels(data, [Decimal(v) for v in y])


def test_whole_float64_labels_written_exactly_are_two_classes(tmp_path) -> None:
    """Two neighbouring float64s, each written exactly: pandas 2's default float
    parser read the first as the second (one class of two labels); they are
    parsed correctly rounded, and the check compares each text with the value
    parsed from it."""
    texts = ["987901288843104896.0", "987901288843105024.0"]
    assert all(not _float64_cannot_hold(text) for text in texts)
    data = _data.load(_csv(tmp_path, texts * 2), test_size=0, scale=False)
    assert data.labels() == [987901288843104896, 987901288843105024]
    _classes_are_the_labels(data, [Decimal(text) for text in texts * 2])


# -- any set of distinct labels ----------------------------------------------------

#: A label as (its exact value, its text in a CSV): integers of any size, written
#: plainly or with ``.0``; floats as Python writes them (``1e+19``, ``0.1``).
_labels = st.one_of(
    st.integers().map(lambda n: (Decimal(n), str(n))),
    st.integers(-(2**70), 2**70).map(lambda n: (Decimal(n), f"{n}.0")),
    st.floats(allow_nan=False, allow_infinity=False).map(
        lambda v: (Decimal(v), repr(v))
    ),
    st.integers(-(2**64), 2**64).map(
        lambda n: (Decimal(float(n)), repr(float(n)))  # whole floats, large too
    ),
    st.integers(-(2**70), 2**70).map(
        lambda n: (Decimal(float(n)), f"{int(float(n))}.0")  # written exactly
    ),
)


def _float64_cannot_hold(text: str) -> bool:
    """Whether a number's text is not exactly any float64 (``0.1``, ``1e23``)."""
    return Decimal(text) != Decimal(float(text))


def _refused_for_a_reason(texts: list[str], error: _data.DataError) -> None:
    """A refusal names a label that float64 cannot hold, or the labels hold a
    fraction (``0.5`` is a float64, but no class label)."""
    message = str(error)
    assert "\n" not in message
    named = re.search(r"the label '(.*)' of 'y' cannot be held exactly", message)
    if named:
        assert named[1] in texts and _float64_cannot_hold(named[1]), (texts, message)
    else:
        assert "non-integer numbers" in message, (texts, message)
        fractions = [t for t in texts if Decimal(t) != Decimal(t).to_integral_value()]
        assert fractions, (texts, message)


@settings(max_examples=150, deadline=None)
@given(st.lists(_labels, min_size=2, max_size=6, unique_by=lambda label: label[0]))
def test_distinct_csv_labels_are_that_many_classes_or_refused(labels) -> None:
    values = [value for value, _ in labels]
    with tempfile.TemporaryDirectory() as folder:
        texts = [text for _, text in labels]
        try:
            data = _data.load(_csv(Path(folder), texts), test_size=0, scale=False)
        except _data.DataError as e:
            _refused_for_a_reason(texts, e)
            return
    assert data.n_classes == len(labels), (data.labels(), texts)  # all distinct
    for code, text, value in zip(data.y_train, texts, values, strict=True):
        label = data.classes[code]  # a name if pandas read the column as text
        assert label == text if isinstance(label, str) else _exact(label) == value


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(), min_size=2, max_size=6, unique=True))
def test_distinct_integer_csv_labels_are_never_refused(labels) -> None:
    """Integers written as integers are read exactly, whatever their size."""
    with tempfile.TemporaryDirectory() as folder:
        path = _csv(Path(folder), [str(n) for n in labels])
        data = _data.load(path, test_size=0, scale=False)
    _classes_are_the_labels(data, [Decimal(n) for n in labels])


_dtypes = st.sampled_from(["float64", "float32", "float16", "int64", "uint64"])


@settings(max_examples=100, deadline=None)
@given(_dtypes, st.data())
def test_distinct_npz_labels_are_that_many_classes_or_refused(dtype, data) -> None:
    from hypothesis.extra.numpy import arrays

    y = data.draw(
        arrays(
            dtype,
            st.integers(2, 6),
            elements={"allow_nan": False, "allow_infinity": False}
            if dtype.startswith("float")
            else None,
            unique=True,
        )
    )
    if len(set(map(_exact, y))) < len(y):  # -0.0 and 0.0: one value
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.npz"
        np.savez(path, X=np.zeros((len(y), 1)), y=y)
        try:
            loaded = _data.load(path, test_size=0, scale=False)
        except _data.DataError as e:
            assert "\n" not in str(e)
            assert dtype.startswith("float"), e  # integers are always exact
            return
    _classes_are_the_labels(loaded, [_exact(v) for v in y])
