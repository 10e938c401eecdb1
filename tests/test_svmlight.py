"""svmlight / libsvm files: read sparse by :func:`dask_ftps._data.load`, trained on
by ``dask-ftps train`` with row-sparse updates.

The files are real: written by scikit-learn's ``dump_svmlight_file`` from
:func:`dask_ftps.sparse_text`, or by hand as LIBSVM publishes them.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import shutil

import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner
from sklearn.datasets import dump_svmlight_file
from sklearn.model_selection import train_test_split

import dask_ftps
from dask_ftps import _data, cli

N_FEATURES = 1 << 12

#: LIBSVM's own style: -1/+1 labels, one-based indices, a comment, a qid.
PLUS_MINUS = """\
# a hand-written libsvm file
-1 1:0.5 3:1
+1 2:1 4:0.25
-1 1:1 # a comment after a line

+1 qid:7 2:0.5 3:-0.5
-1 1:0.7
+1 4:2
-1 1:0.2 3:0.3
+1 2:0.9 4:1
"""


@pytest.fixture(scope="module")
def text():
    """The generator's data: X (CSR float32, 600 x 4096, 3 classes) and y."""
    return dask_ftps.sparse_text(
        n_samples=600, n_features=N_FEATURES, n_classes=3, nnz=20
    )


@pytest.fixture(scope="module")
def text_svm(tmp_path_factory, text) -> str:
    """``text`` as a one-based svmlight file (as LIBSVM writes them)."""
    path = tmp_path_factory.mktemp("svm") / "text.svm"
    dump_svmlight_file(*text, str(path), zero_based=False)
    return str(path)


def _write(folder, name: str, content: str) -> str:
    path = folder / name
    path.write_text(content)
    return str(path)


def _same(a, b) -> bool:
    """Two sparse matrices of the same shape and values."""
    return a.shape == b.shape and (a != b).nnz == 0


def test_load_keeps_the_file_sparse_and_splits_like_the_dense_loader(
    text_svm, text
) -> None:
    X, y = text
    data = _data.load(text_svm, scale=False)
    for part in (data.X_train, data.X_test):
        assert sp.issparse(part) and part.format == "csr"
        assert part.dtype == np.float32 and part.shape[1] == N_FEATURES
    assert (data.n_train, data.n_test) == (450, 150)  # ceil(0.25 * 600) held out
    assert data.sparse and data.n_features == N_FEATURES and data.n_classes == 3
    assert data.labels() == [0, 1, 2] and data.target == "label"
    assert data.y_train.dtype == np.int64 and data.features == ()
    assert data.zero_based is False and data.mean is None and data.scale is None
    # The stratified split of SPLIT_SEED, on sparse rows: the rows the dense
    # loader's split would give, values exact (float32 written and read back).
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.25, random_state=_data.SPLIT_SEED, stratify=y
    )
    assert _same(data.X_train, X_train) and _same(data.X_test, X_test)
    np.testing.assert_array_equal(data.y_train, y_train)
    np.testing.assert_array_equal(data.y_test, y_test)
    again = _data.load(text_svm, scale=False)
    assert _same(again.X_train, data.X_train) and _same(again.X_test, data.X_test)
    np.testing.assert_array_equal(again.y_test, data.y_test)
    assert data.describe() == (
        f"{text_svm} (svmlight, one-based indices): 450 train / 150 test samples, "
        f"4096 features (sparse: {X.nnz / 600:.1f} nonzero per sample, unscaled), "
        "3 classes of 'label'"
    )


def test_scaling_divides_each_column_by_its_largest_absolute_value(text_svm) -> None:
    raw = _data.load(text_svm, scale=False)
    data = _data.load(text_svm)
    assert sp.issparse(data.X_train) and data.mean is None
    assert data.scale.shape == (N_FEATURES,) and "max-abs scaled" in data.describe()
    # fit on the training rows: each column they hold peaks at 1, zeros stay zero
    peak = abs(data.X_train).max(axis=0).toarray().ravel()
    held = np.unique(raw.X_train.indices)
    np.testing.assert_allclose(peak[held], 1, rtol=1e-6)
    assert data.X_train.nnz == raw.X_train.nnz and data.X_test.nnz == raw.X_test.nnz
    # the test rows are scaled alike (a column absent from training keeps scale 1)
    scale = sp.diags(data.scale.astype(np.float32))
    np.testing.assert_allclose(
        (data.X_test @ scale).toarray(), raw.X_test.toarray(), rtol=1e-6
    )


@pytest.mark.parametrize(
    ("suffix", "opener"),
    [(".svm.gz", gzip.open), (".svmlight.bz2", bz2.open), (".libsvm.xz", lzma.open)],
)
def test_compressed_files_read_alike(tmp_path, text_svm, suffix, opener) -> None:
    path = tmp_path / f"text{suffix}"
    with open(text_svm, "rb") as src, opener(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain, packed = _data.load(text_svm), _data.load(path)
    assert _same(plain.X_train, packed.X_train) and _same(plain.X_test, packed.X_test)
    np.testing.assert_array_equal(plain.y_test, packed.y_test)


def test_a_hand_written_libsvm_file_with_plus_minus_one_labels(tmp_path) -> None:
    path = _write(tmp_path, "pm.libsvm", PLUS_MINUS)
    data = _data.load(path, test_size=0, scale=False)
    assert data.labels() == [-1, 1]  # the codes 0, 1 map back to -1, +1
    np.testing.assert_array_equal(data.y_train, [0, 1, 0, 1, 0, 1, 0, 1])
    assert data.zero_based is False and data.n_features == 4  # indices 1..4
    expected = np.array(
        [[0.5, 0, 1, 0], [0, 1, 0, 0.25], [1, 0, 0, 0], [0, 0.5, -0.5, 0],
         [0.7, 0, 0, 0], [0, 0, 0, 2], [0.2, 0, 0.3, 0], [0, 0.9, 0, 1]],
        dtype=np.float32,
    )  # fmt: skip
    np.testing.assert_array_equal(data.X_train.toarray(), expected)
    scaled = _data.load(path, test_size=0)
    np.testing.assert_array_equal(scaled.scale, [1, 1, 1, 2])
    assert abs(scaled.X_train).max() == 1
    split = _data.load(path)  # 8 rows: 2 held out, one per class
    assert (split.n_train, split.n_test) == (6, 2)
    assert sorted(split.y_test.tolist()) == [0, 1]
    lines = cli._label_lines(split)
    assert lines == ["labels of 'label' (code=label): 0=-1, 1=1"]


def test_indices_are_zero_based_when_the_file_holds_an_index_0(tmp_path) -> None:
    zero = _data.load(_write(tmp_path, "z.svm", "0 0:1 2:1\n1 1:1\n"), test_size=0)
    assert zero.zero_based is True and zero.n_features == 3
    assert "zero-based" in zero.describe()
    one = _data.load(_write(tmp_path, "o.svm", "0 1:1 3:1\n1 2:1\n"), test_size=0)
    assert one.zero_based is False and one.n_features == 3
    np.testing.assert_array_equal(one.X_train.toarray(), zero.X_train.toarray())
    wide = _data.load(tmp_path / "o.svm", test_size=0, n_features=10)
    assert wide.n_features == 10 and wide.X_train.nnz == 3
    with pytest.raises(
        _data.DataError,
        match=r"o\.svm has feature indices up to 3 "
        r"\(one-based: 3 features\), more than the 2 features",
    ):
        _data.load(tmp_path / "o.svm", test_size=0, n_features=2)  # fmt: skip


def test_a_wide_file_is_never_dense(tmp_path) -> None:
    """2**20 features: CSR all the way (dense, X would take 2 GB)."""
    X, y = dask_ftps.sparse_text(n_samples=500, n_features=1 << 20, n_classes=2, nnz=5)
    path = tmp_path / "wide.svm"
    dump_svmlight_file(X, y, str(path), zero_based=False)
    data = _data.load(path, n_features=1 << 20)
    assert data.n_features == 1 << 20
    assert sp.issparse(data.X_train) and sp.issparse(data.X_test)
    assert data.X_train.nnz + data.X_test.nnz == X.nnz
    assert data.scale.nbytes == 8 << 20  # one float64 per feature, not per value


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "message"),
    [
        ("bad.svm", "1 1:0.5 3:2\n\n-1 2:1 oops\n", {},
         r"bad\.svm: line 3: 'oops' is not index:value"),
        ("bad.svm", "1 1:0.5\n-1 2:x\n", {}, r"bad\.svm: line 2: '2:x' is not index:value"),
        ("bad.svm", "# c\n1 3:1 2:1\n", {},
         r"bad\.svm: line 2: the feature index 2 follows 3: indices must increase"),
        ("bad.svm", "1 1:1\nyes 2:1\n", {}, r"line 2: the label 'yes' is not a number"),
        ("bad.svm", "1 -3:1\n", {}, r"line 1: the feature index -3 is not in"),
        ("multi.svm", "0 1:1\n1,2 3:1\n", {},
         (r"multi\.svm: line 2: multi-label line \(labels '1,2'\): multi-label data "
          "is not supported")),
        ("empty.svm", "", {}, r"empty\.svm is empty: it holds no lines"),
        ("empty.svm", "# only a comment\n\n", {}, r"empty\.svm is empty"),
        ("nan.svm", "0 1:1\n# c\n1 1:0.5 2:nan\n", {},
         (r"nan\.svm: 1 NaN or infinite feature values, the first on line 3 "
          r"\(feature index 2\)")),
        ("inf.svm", "0 1:-inf\n1 1:1\n", {}, r"1 NaN or infinite feature values"),
        ("labels.svm", "0\n1\n", {}, r"holds no feature values: each of its 2 lines"),
        ("nanlabel.svm", "nan 1:1\n1 1:1\n", {}, r"labels 'label' hold NaN"),
        ("reg.svm", "0.5 1:1\n1.5 1:2\n", {}, r"non-integer numbers such as 0\.5"),
        ("huge.svm", "9007199254740993 1:1\n1 2:1\n", {},
         r"labels of magnitude 2\*\*53 or more, such as 9007199254740992"),
        ("one.svm", "1 1:1\n1 2:1\n", {}, r"a single class \(1\)"),
        ("t.svm", "0 1:1\n1 1:1\n", {"target": "y"}, r"a target column applies to"),
        ("t.svm.zst", "0 1:1\n", {}, r"compressed with \.gz, \.bz2, \.xz, not \.zst"),
        ("t.svm.gz", "0 1:1\n", {}, r"cannot read .*t\.svm\.gz as svmlight/libsvm: "),
        ("t.csv", "a,y\n1,0\n2,1\n", {"n_features": 3},
         r"--n-features\) applies to an svmlight/libsvm file"),
    ],
)  # fmt: skip
def test_bad_files_are_one_line(tmp_path, name, content, kwargs, message) -> None:
    path = _write(tmp_path, name, content)
    with pytest.raises(_data.DataError, match=message) as caught:
        _data.load(path, test_size=0, **kwargs)
    assert "\n" not in str(caught.value)


def test_the_command_says_a_bad_line_in_one_line(tmp_path) -> None:
    path = _write(tmp_path, "bad.svm", "1 1:0.5\n-1 2:1 oops\n")
    result = CliRunner().invoke(cli.main, ["train", path])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        f"Error: {path}: line 2: 'oops' is not index:value (an integer index, a number)"
    ]
    result = CliRunner().invoke(cli.main, ["train", "--n-features", "5"])
    assert result.exit_code == 1 and "applies to an svmlight/libsvm" in result.stderr


@pytest.mark.slow
def test_train_an_svmlight_file_with_row_sparse_updates(tmp_path, text_svm) -> None:
    """``dask-ftps train text.svm``: trained on sparse minibatches, journalled as
    row-sparse updates, its output saved."""
    store, out = tmp_path / "text.zarr", tmp_path / "out"
    result = CliRunner().invoke(
        cli.main,
        [
            "train", text_svm, "--epochs", "2", "--hidden", "", "--lr", "0.5",
            "--n-workers", "1", "--n-features", str(N_FEATURES),
            "--store", str(store), "-o", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "text.svm (svmlight, one-based indices): 450 train / 150 test samples, " in (
        result.output
    )
    score = re.search(
        r"^SoftmaxRegression: test accuracy ([\d.]+) at model version (\d+);",
        result.output,
        re.MULTILINE,
    )
    assert score, result.output
    # chance: 1/3; the largest class is 0.39 of the test rows
    assert float(score[1]) > 0.4, result.output
    version = int(score[2])
    assert version == 2 * 15  # 450 rows in minibatches of 32, two epochs
    info = dask_ftps.inspect(str(store))
    assert info["updates"] == version
    assert info["sparse_updates"] > 0, info["sparse_updates"]
    meta = json.loads((out / "model.json").read_text())
    assert meta["svmlight"] == {"n_features": N_FEATURES, "zero_based": False}
    assert meta["features"] is None and meta["target"] == "label"
    assert len(meta["scaler"]["max_abs"]) == N_FEATURES
    assert meta["model"]["n_features"] == N_FEATURES
    assert meta["train_accuracy"] > 0.6
    assert meta["test_accuracy"] == pytest.approx(float(score[1]), abs=1e-4)
    params = np.load(out / "params.npz")
    assert params["W"].shape == (N_FEATURES, 3)
