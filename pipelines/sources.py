"""Where a backfill's images are: a folder, an ``s3://`` prefix, or a Parquet/CSV listing of URIs.

A listing has a column ``uri`` (else its first column); relative paths in it are taken from the
listing's folder. S3 goes through pyarrow's filesystem layer (credentials and endpoint from the
usual ``AWS_*`` variables, ``AWS_ENDPOINT_URL`` for S3-compatible stores), so no new dependency.
"""

from __future__ import annotations

import os
from pathlib import Path

from headmaster.errors import PipelineError
from headmaster.images import IMAGE_SUFFIXES, collect_images

LISTING_SUFFIXES = (".parquet", ".csv")


def _s3(uri: str):
    import pyarrow.fs as pafs

    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    options = {}
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        options = {"endpoint_override": host.rstrip("/"), "scheme": scheme or "https"}
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        options["region"] = region
    return pafs.S3FileSystem(**options), uri[len("s3://") :]


def read_uri(uri: str) -> bytes:
    """The bytes at a path or ``s3://bucket/key``; OSError when they cannot be read."""
    if uri.startswith("s3://"):
        fs, path = _s3(uri)
        with fs.open_input_stream(path) as f:
            return f.read()
    return Path(uri).read_bytes()


def _listing(path: Path) -> list[str]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid, OSError...
        raise PipelineError(f"cannot read the listing {path}: {e}", option="source") from None
    if table.num_columns == 0 or table.num_rows == 0:
        raise PipelineError(f"the listing {path} holds no URIs", option="source")
    column = table["uri"] if "uri" in table.column_names else table.column(0)
    base = path.parent.resolve()
    uris = []
    for value in column.to_pylist():
        if value is None or not str(value).strip():
            continue
        value = str(value).strip()
        uris.append(value if value.startswith("s3://") or os.path.isabs(value) else str(base / value))
    return uris


def list_source(source: str) -> list[str]:
    """Every image URI of a backfill's SOURCE, in a stable order."""
    if source.startswith("s3://"):
        import pyarrow.fs as pafs

        fs, prefix = _s3(source)
        try:
            infos = fs.get_file_info(pafs.FileSelector(prefix.rstrip("/"), recursive=True))
        except OSError as e:
            raise PipelineError(f"cannot list {source}: {e}", option="source") from None
        return sorted(
            f"s3://{i.path}"
            for i in infos
            if i.type == pafs.FileType.File and Path(i.path).suffix.lower() in IMAGE_SUFFIXES
        )
    path = Path(source)
    if path.is_dir():
        return [str(p.resolve()) for p in collect_images([path])]
    if path.is_file() and path.suffix.lower() in LISTING_SUFFIXES:
        return _listing(path)
    if not path.exists():
        raise PipelineError(
            f"source {source} does not exist: give a folder, an s3:// prefix, or a Parquet/CSV listing of URIs",
            option="source",
        )
    raise PipelineError(
        f"source {source} is neither a folder, an s3:// prefix, nor a .parquet/.csv listing", option="source"
    )
