"""training.data: labelled images from bucket folders or a manifest (CSV / JSONL), on real tiny PNGs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from headmaster.errors import DataError
from headmaster.training.data import Dataset, Example, content_hash, from_folders, from_manifest, read_labelled


def png(path: Path, colour=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path, format="PNG")
    return path


@pytest.fixture
def buckets(tmp_path) -> Path:
    root = tmp_path / "data"
    png(root / "dog" / "b.png")
    png(root / "dog" / "a.PNG")
    png(root / "dog" / "deep" / "c.png")
    png(root / "cat" / "x.png")
    png(root / "cat" / ".hidden.png")  # hidden: neither an example nor "skipped"
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / "README").write_text("no suffix")
    png(root / ".cache" / "y.png")  # a hidden folder is no bucket
    (root / "stray.png").write_bytes(b"")  # a file at the top is no bucket either
    return root


# -- bucket folders ----------------------------------------------------------------------------
def test_labels_come_from_folder_names_sorted(buckets):
    data = from_folders(buckets)
    assert data.labels == ("cat", "dog")
    assert data.multi_label is False
    assert data.source == str(buckets)
    assert data.examples == (
        Example(buckets / "cat" / "x.png", ("cat",)),
        Example(buckets / "dog" / "a.PNG", ("dog",)),
        Example(buckets / "dog" / "b.png", ("dog",)),
        Example(buckets / "dog" / "deep" / "c.png", ("dog",)),
    )
    assert data.counts() == {"cat": 1, "dog": 3}


def test_non_image_names_are_skipped_and_listed(buckets):
    data = from_folders(buckets)
    assert sorted(data.skipped) == [
        (str(buckets / "cat" / "README"), "not an image file name"),
        (str(buckets / "cat" / "notes.txt"), "not an image file name"),
    ]
    assert not any(".hidden" in str(e.path) or ".cache" in str(e.path) for e in data.examples)
    assert not any(".hidden" in path for path, _ in data.skipped)


def test_a_single_bucket_is_refused_with_what_to_add(tmp_path):
    png(tmp_path / "data" / "cat" / "x.png")
    png(tmp_path / "data" / ".hidden" / "y.png")  # does not count as a second bucket
    with pytest.raises(DataError) as e:
        from_folders(tmp_path / "data")
    assert "single bucket (cat)" in str(e.value)
    assert "add a folder of images without it, e.g. 'not cat'" in str(e.value)


def test_an_empty_bucket_is_refused(tmp_path):
    png(tmp_path / "data" / "cat" / "x.png")
    (tmp_path / "data" / "dog").mkdir()
    (tmp_path / "data" / "dog" / "list.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"bucket 'dog' in .* has no images \(looked for .*\.png"):
        from_folders(tmp_path / "data")


def test_no_folder_or_no_buckets(tmp_path):
    with pytest.raises(DataError, match="is not a folder; give a folder with one sub-folder per bucket"):
        from_folders(tmp_path / "missing")
    png(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match="has no sub-folders: put each bucket's images in a folder named after"):
        from_folders(tmp_path / "flat")


# -- manifests -------------------------------------------------------------------------------------
@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    return {
        name: png(tmp_path / "imgs" / f"{name}.png", colour)
        for name, colour in (("a", (1, 2, 3)), ("b", (4, 5, 6)), ("c", (7, 8, 9)), ("d", (10, 11, 12)))
    }


def test_csv_manifest_with_semicolons_and_pipes(tmp_path, images):
    manifest = tmp_path / "train.csv"
    manifest.write_text(
        f"path,labels\nimgs/a.png,outdoor;dog\n{images['b']},outdoor|night\nimgs/c.png,\n./imgs/d.png, dog ; ;night \n"
    )
    data = from_manifest(manifest)
    assert data.multi_label is True
    assert data.labels == ("dog", "night", "outdoor")
    assert data.source == str(manifest)
    assert data.examples == (
        Example(images["a"].resolve(), ("dog", "outdoor")),
        Example(images["b"], ("night", "outdoor")),
        Example(images["c"].resolve(), ()),
        Example(images["d"].resolve(), ("dog", "night")),
    )
    assert data.counts() == {"dog": 2, "night": 2, "outdoor": 2}


def test_relative_paths_start_at_the_manifest_not_the_working_directory(tmp_path, images, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "m.csv").write_text("path,labels\n../imgs/a.png,x\n../imgs/b.png,\n")
    data = from_manifest(lists / "m.csv")
    assert [e.path for e in data.examples] == [images["a"].resolve(), images["b"].resolve()]
    assert all(e.path.is_file() for e in data.examples)


def test_jsonl_manifest(tmp_path, images):
    manifest = tmp_path / "train.jsonl"
    lines = [
        {"path": "imgs/a.png", "labels": ["sea", "boat", "sea"]},
        {"path": str(images["b"]), "labels": []},
        {"path": "imgs/c.png"},  # no labels: none
        {"path": "imgs/d.png", "labels": ["sea"]},
    ]
    manifest.write_text(
        "\n".join(json.dumps(line) for line in lines[:2])
        + "\n\n"
        + "\n".join(json.dumps(line) for line in lines[2:])
        + "\n"
    )
    data = from_manifest(manifest)
    assert data.labels == ("boat", "sea")
    assert [(e.path, e.labels) for e in data.examples] == [
        (images["a"].resolve(), ("boat", "sea")),
        (images["b"], ()),
        (images["c"].resolve(), ()),
        (images["d"].resolve(), ("sea",)),
    ]


def test_a_malformed_jsonl_line_names_its_number(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "a.png", "labels": ["x"]}\n{"labels": ["y"]}\n')
    with pytest.raises(DataError, match=r"m\.jsonl:2: expected"):
        from_manifest(manifest)
    manifest.write_text('{"path": "a.png", "labels": ["x"]}\nnot json\n')
    with pytest.raises(DataError, match=r"m\.jsonl:2: expected"):
        from_manifest(manifest)


def test_a_label_on_every_image_is_refused(tmp_path, images):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,labels\nimgs/a.png,photo;dog\nimgs/b.png,photo\nimgs/c.png,photo;cat\n")
    with pytest.raises(DataError, match=r"label 'photo' is on every image of .*needs images without it too"):
        from_manifest(manifest)


@pytest.mark.parametrize(
    "text, message",
    [
        ("file,tags\na.png,x\n", "needs the columns path,labels"),
        ("path,labels\n", "lists no images"),
        ("path,labels\na.png,\nb.png,\n", "gives no labels at all"),
    ],
)
def test_manifest_errors(tmp_path, text, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(DataError, match=message):
        from_manifest(manifest)


def test_a_values_csv_given_as_a_labels_manifest_names_task_regression(tmp_path):
    manifest = tmp_path / "values.csv"
    manifest.write_text("path,quality\na.png,0.5\nb.png,2\n")
    with pytest.raises(DataError) as caught:
        from_manifest(manifest)
    assert str(caught.value) == (
        f"{manifest}: a CSV manifest needs the columns path,labels (got ['path', 'quality']); "
        "path,quality (a number per image) is what a regression head trains on: "
        "`train-head --task regression`"
    )
    manifest.write_text("file,quality\na.png,0.5\n")  # no path column: no such guess
    with pytest.raises(DataError) as caught:
        from_manifest(manifest)
    assert str(caught.value).endswith("(got ['file', 'quality'])")


def test_a_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        from_manifest(tmp_path / "nope.csv")


# -- read_labelled: exactly one source -------------------------------------------------------------
def test_read_labelled_needs_exactly_one_source(tmp_path, buckets, images):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,labels\nimgs/a.png,x\nimgs/b.png,\n")
    for data, man in ((None, None), (buckets, manifest)):
        with pytest.raises(DataError, match="give one labelled data source") as e:
            read_labelled(data, man)
        assert e.value.option == "data"
    assert read_labelled(buckets, None) == from_folders(buckets)
    assert read_labelled(None, manifest) == from_manifest(manifest)
    assert isinstance(read_labelled(None, manifest), Dataset)


# -- content_hash ------------------------------------------------------------------------------------
def test_content_hash_is_order_free_and_label_sensitive():
    a, b = "a" * 64, "b" * 64
    rows = [(a, ("cat",)), (b, ("dog", "outdoor"))]
    expected = "sha256:" + hashlib.sha256(f"{a}\tcat\n{b}\tdog;outdoor\n".encode()).hexdigest()
    assert content_hash(rows) == expected
    assert content_hash(list(reversed(rows))) == expected
    assert content_hash([(a, ("dog",)), (b, ("dog", "outdoor"))]) != expected
    assert content_hash(rows[:1]) != expected
    assert content_hash([]) == "sha256:" + hashlib.sha256(b"").hexdigest()
