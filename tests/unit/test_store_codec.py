"""store.base: the Arrow codecs every backend shares (label rows, latest-wins reads, embedding
columns) and the shared Store methods, on a ParquetStore in a temporary folder."""

from __future__ import annotations

import datetime as dt
import hashlib

import numpy as np
import pyarrow as pa
import pytest

from headmaster.client.results import Classification, HeadResult
from headmaster.errors import StoreError
from headmaster.store import open_store
from headmaster.store.base import (
    Correction,
    StoredItem,
    classification_tables,
    correction_schema,
    embedding_column,
    embedding_matrix,
    label_schema,
    label_table,
    latest,
)

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
FP = "sha256:" + "f" * 64


def sha(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


# -- label_table -------------------------------------------------------------------------------
def test_label_table_columns():
    scores = np.array([[0.9, 0.1, 0.5], [0.6, 0.7, 0.0], [0.2, 0.3, 0.1]], np.float64)
    accepted = np.array([[True, False, True], [True, True, False], [False, False, False]])
    table = label_table(["a", "b", "c"], FP, 3, scores, ["cat", "dog", "bird"], accepted, "classify", T0)
    assert table.schema == label_schema()
    assert table.num_rows == 3
    assert table["sha256"].to_pylist() == ["a", "b", "c"]
    assert table["fingerprint"].to_pylist() == [FP] * 3
    assert table["version"].to_pylist() == [3] * 3
    assert table["source"].to_pylist() == ["classify"] * 3
    assert table["at"].to_pylist() == [T0] * 3
    assert table["labels"].to_pylist() == [["cat", "bird"], ["cat", "dog"], []]
    stored = np.array(table["scores"].to_pylist(), np.float32)
    np.testing.assert_array_equal(stored, scores.astype(np.float32))


def test_label_table_labels_match_a_random_matrix():
    rng = np.random.default_rng(1)
    names = [f"l{i}" for i in range(5)]
    accepted = rng.random((40, 5)) < 0.3
    accepted[7] = False  # an empty row in the middle
    accepted[8] = True  # a full one
    scores = rng.random((40, 5)).astype(np.float32)
    table = label_table([sha(i) for i in range(40)], FP, 1, scores, names, accepted, "rescore", T0)
    expected = [[names[j] for j in range(5) if accepted[i, j]] for i in range(40)]
    assert table["labels"].to_pylist() == expected
    assert table["labels"][7].as_py() == [] and table["labels"][8].as_py() == names


def test_label_table_takes_an_arrow_array_of_hashes():
    hashes = pa.array(["x", "y"], pa.string())
    table = label_table(hashes, FP, 1, np.zeros((2, 2)), ["a", "b"], np.eye(2, dtype=bool), "s", T0)
    assert table["sha256"].to_pylist() == ["x", "y"]
    assert table["labels"].to_pylist() == [["a"], ["b"]]


def test_label_table_with_no_rows():
    table = label_table([], FP, 1, np.zeros((0, 2), np.float32), ["a", "b"], np.zeros((0, 2), bool), "s", T0)
    assert table.num_rows == 0
    assert table.schema == label_schema()


def test_label_table_without_a_time_is_stamped_now():
    before = dt.datetime.now(UTC)
    table = label_table(["a"], FP, 1, np.zeros((1, 1)), ["x"], np.ones((1, 1), bool), "s")
    after = dt.datetime.now(UTC)
    at = table["at"][0].as_py()
    assert before - dt.timedelta(microseconds=1) <= at <= after


# -- latest ------------------------------------------------------------------------------------
def labels_at(hashes, version, at):
    n = len(hashes)
    return label_table(hashes, FP, version, np.zeros((n, 1)), ["x"], np.zeros((n, 1), bool), "s", at)


def test_latest_keeps_the_newest_row_per_key():
    table = pa.concat_tables(
        [
            labels_at(["a", "b", "c"], 1, T0),
            labels_at(["a"], 2, T0 + dt.timedelta(hours=1)),
            labels_at(["b"], 3, T0 - dt.timedelta(hours=1)),  # written later, but older
        ]
    )
    result = latest(table, ["sha256"])
    assert dict(zip(result["sha256"].to_pylist(), result["version"].to_pylist())) == {"a": 2, "b": 1, "c": 1}
    assert result.schema == label_schema()
    assert result["sha256"].to_pylist() == ["a", "b", "c"]  # one row each


def test_latest_ties_go_to_the_row_written_last():
    table = pa.concat_tables([labels_at(["a", "b"], 1, T0), labels_at(["a"], 2, T0), labels_at(["a"], 3, T0)])
    result = latest(table, ["sha256"])
    assert dict(zip(result["sha256"].to_pylist(), result["version"].to_pylist())) == {"a": 3, "b": 1}


def test_latest_of_an_empty_table():
    empty = label_schema().empty_table()
    assert latest(empty, ["sha256"]).num_rows == 0


def test_latest_matches_a_reference_on_random_rows():
    """Many keys, several keys per row, few distinct times (so ties): against a plain loop."""
    rng = np.random.default_rng(7)
    n = 300
    heads = rng.choice(["animals", "mood"], n).tolist()
    items = rng.choice([sha(i) for i in range(12)], n).tolist()
    minutes = rng.integers(0, 4, n)
    at = [T0 + dt.timedelta(minutes=int(m)) for m in minutes]
    table = pa.table(
        {
            "sha256": items,
            "head": heads,
            "labels": [[str(i)] for i in range(n)],
            "by": ["me"] * n,
            "at": at,
            "note": [str(i) for i in range(n)],
        },
        schema=correction_schema(),
    )
    # written in three appends, as the store does, so the table has several chunks
    table = pa.concat_tables([table.slice(0, 100), table.slice(100, 150), table.slice(250)])
    expected = {}
    for row in range(n):  # newest wins; equal times: the later row wins
        key = (heads[row], items[row])
        if key not in expected or at[row] >= at[expected[key]]:
            expected[key] = row
    result = latest(table, ["head", "sha256"])
    got = {
        (h, s): int(note)
        for h, s, note in zip(result["head"].to_pylist(), result["sha256"].to_pylist(), result["note"].to_pylist())
    }
    assert got == expected
    assert result.num_rows == len(expected)


def test_latest_orders_by_another_column():
    table = pa.concat_tables([labels_at(["a"], 5, T0 + dt.timedelta(days=1)), labels_at(["a"], 9, T0)])
    assert latest(table, ["sha256"], order="version")["version"].to_pylist() == [9]
    assert latest(table, ["sha256"])["version"].to_pylist() == [5]


# -- embedding columns ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_embedding_round_trip(dtype):
    matrix = np.random.default_rng(0).normal(size=(5, 8)).astype(dtype)
    column = embedding_column(matrix)
    assert pa.types.is_fixed_size_list(column.type)
    assert column.type.list_size == 8
    assert column.type.value_type == pa.from_numpy_dtype(np.dtype(dtype))
    assert len(column) == 5
    back = embedding_matrix(column)
    assert back.dtype == np.float32
    assert back.shape == (5, 8)
    np.testing.assert_array_equal(back, matrix.astype(np.float32))


def test_a_non_contiguous_matrix_round_trips():
    matrix = np.arange(48, dtype=np.float32).reshape(6, 8)[::2, ::2]  # [3, 4], strided
    np.testing.assert_array_equal(embedding_matrix(embedding_column(matrix)), matrix)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_zero_rows_give_an_empty_matrix_of_width_d(dtype):
    column = embedding_column(np.zeros((0, 8), dtype))
    assert embedding_matrix(column).shape == (0, 8)
    # the usual case: a read that finds none of the asked items (a filter, then the column)
    table = pa.table({"sha256": ["a", "b"], "embedding": embedding_column(np.ones((2, 8), dtype))})
    none = table.filter(pa.array([False, False]))
    matrix = embedding_matrix(none["embedding"])
    assert matrix.shape == (0, 8) and matrix.dtype == np.float32


def test_chunked_and_sliced_columns():
    a = np.arange(16, dtype=np.float32).reshape(2, 8)
    b = -np.arange(24, dtype=np.float32).reshape(3, 8)
    chunked = pa.chunked_array([embedding_column(a), embedding_column(b)])
    np.testing.assert_array_equal(embedding_matrix(chunked), np.concatenate([a, b]))
    sliced = embedding_column(np.concatenate([a, b])).slice(1, 3)
    np.testing.assert_array_equal(embedding_matrix(sliced), np.concatenate([a, b])[1:4])


def test_variable_size_lists_are_read_when_rows_are_equal():
    column = pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float64()))
    np.testing.assert_array_equal(embedding_matrix(column), np.array([[1, 2], [3, 4]], np.float32))
    with pytest.raises(StoreError, match="embedding rows of unequal length: 5 values in 2 rows"):
        embedding_matrix(pa.array([[1.0, 2.0], [3.0, 4.0, 5.0]]))


# -- classification_tables ------------------------------------------------------------------------
def classification(n: int, **heads: HeadResult) -> Classification:
    return Classification(f"img{n}.jpg", sha(n), np.zeros(8, np.float32), dict(heads))


def test_classification_tables_group_by_head_version():
    results = [
        classification(
            1,
            animals=HeadResult("animals", 1, ("cat",), {"cat": 0.9, "dog": 0.1}),
            mood=HeadResult("mood", 4, (), {"happy": 0.2, "sad": 0.3, "calm": 0.1}),
        ),
        # a hot swap lands mid-run: version 2, with its scores in another order
        classification(2, animals=HeadResult("animals", 2, ("dog",), {"dog": 0.8, "cat": 0.2})),
        classification(3, animals=HeadResult("animals", 1, ("cat", "dog"), {"dog": 0.7, "cat": 0.6})),
        classification(4),  # no heads at all
    ]
    tables = classification_tables(results, FP)
    assert sorted(tables) == ["animals", "mood"]
    v1, v2 = tables["animals"]
    assert v1["version"].to_pylist() == [1, 1] and v2["version"].to_pylist() == [2]
    assert v1["sha256"].to_pylist() == [sha(1), sha(3)]
    assert v2["sha256"].to_pylist() == [sha(2)]
    # scores follow the label order of the group's first row, looked up by name in every row
    np.testing.assert_allclose(v1["scores"].to_pylist(), [[0.9, 0.1], [0.6, 0.7]], rtol=1e-6)
    assert v1["labels"].to_pylist() == [["cat"], ["cat", "dog"]]
    np.testing.assert_allclose(v2["scores"].to_pylist(), [[0.8, 0.2]], rtol=1e-6)
    assert v2["labels"].to_pylist() == [["dog"]]
    [mood] = tables["mood"]
    assert mood["labels"].to_pylist() == [[]]
    np.testing.assert_allclose(mood["scores"].to_pylist(), [[0.2, 0.3, 0.1]], rtol=1e-6)
    every = [t for ts in tables.values() for t in ts]
    assert {t["source"][0].as_py() for t in every} == {"classify"}
    assert {t["fingerprint"][0].as_py() for t in every} == {FP}
    assert len({t["at"][0].as_py() for t in every}) == 1  # one run, one time


def test_classification_tables_of_nothing():
    assert classification_tables([], FP) == {}
    assert classification_tables([classification(1)], FP) == {}


# -- the shared Store methods, on a Parquet store -------------------------------------------------
@pytest.fixture
def store(tmp_path):
    return open_store(tmp_path / "store")


def test_add_items_groups_by_fingerprint(store):
    other = "sha256:" + "e" * 64
    rng = np.random.default_rng(3)
    items = [
        StoredItem(sha(i), f"/img/{i}.jpg", FP if i % 2 else other, rng.normal(size=4).astype(np.float64))
        for i in range(6)
    ]
    store.add_items(items)
    assert store.fingerprints() == {FP: 3, other: 3}
    for fingerprint in (FP, other):
        mine = [i for i in items if i.fingerprint == fingerprint]
        got = store.embeddings([i.sha256 for i in items], fingerprint)
        assert set(got) == {i.sha256 for i in mine}
        for item in mine:
            assert got[item.sha256].dtype == np.float32
            np.testing.assert_array_equal(got[item.sha256], item.embedding.astype(np.float32))
    assert store.uris()[sha(1)] == {FP: "/img/1.jpg"}


def test_add_classifications_then_labels(store):
    store.add_classifications(
        [
            classification(1, animals=HeadResult("animals", 1, ("cat",), {"cat": 0.9, "dog": 0.1})),
            classification(2, animals=HeadResult("animals", 2, ("dog",), {"cat": 0.3, "dog": 0.7})),
        ],
        FP,
    )
    assert store.label_heads() == ["animals"]
    table = store.labels("animals")
    assert dict(zip(table["sha256"].to_pylist(), table["labels"].to_pylist())) == {sha(1): ["cat"], sha(2): ["dog"]}
    assert store.labels("animals", version=2)["sha256"].to_pylist() == [sha(2)]


def test_corrections_newest_wins(store):
    store.add_corrections(
        [
            Correction(sha(1), "animals", ("cat",), "ann", T0),
            Correction(sha(1), "animals", ("dog",), "bob", T0 + dt.timedelta(minutes=1), note="look again"),
            Correction(sha(2), "animals", (), "ann", T0),
            Correction(sha(1), "mood", ("sad",), "ann", T0 + dt.timedelta(days=1)),
        ]
    )
    store.add_corrections([Correction(sha(2), "animals", ("cat", "dog"), "cy", T0)])  # same time, written later
    got = store.corrections("animals")
    assert got == {
        sha(1): Correction(sha(1), "animals", ("dog",), "bob", T0 + dt.timedelta(minutes=1), "look again"),
        sha(2): Correction(sha(2), "animals", ("cat", "dog"), "cy", T0),
    }
    assert store.corrections("mood")[sha(1)].labels == ("sad",)
    assert store.corrections("nothing") == {}


def test_resolve(store, tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"some image bytes")
    photo_sha = hashlib.sha256(b"some image bytes").hexdigest()
    twins = ["abcdef01" + "0" * 56, "abcdef01" + "1" * 56]
    known = {photo_sha: {FP: "s3://bucket/photo.jpg"}, twins[0]: {FP: None}, twins[1]: {FP: "/b.jpg"}}
    assert store.resolve(photo_sha, known) == photo_sha
    assert store.resolve(photo_sha[:8], known) == photo_sha
    assert store.resolve(twins[1][:57], known) == twins[1]
    assert store.resolve("s3://bucket/photo.jpg", known) == photo_sha
    assert store.resolve(str(photo), known) == photo_sha
    with pytest.raises(StoreError, match="matches 2 stored items; give more of its sha256"):
        store.resolve("abcdef01", known)
    with pytest.raises(StoreError, match="is neither a stored sha256, a stored URI, nor a readable file"):
        store.resolve("nowhere.jpg", known)
    other = tmp_path / "other.jpg"
    other.write_bytes(b"never classified")
    with pytest.raises(StoreError, match=f"the file {other} was never classified with --store"):
        store.resolve(str(other), known)
