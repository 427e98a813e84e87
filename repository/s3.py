"""A model repository in S3 (AWS, MinIO, Ceph: any S3 API), through a local working copy.

Triton reads ``s3://`` repositories itself (``--model-repository=s3://host:port/bucket/prefix``,
credentials from the AWS_* environment variables). Every Headmaster command that reads or
changes a repository works on a local folder, so ``--repo s3://bucket/prefix`` means: bring the
bucket's objects into a working copy (``HEADMASTER_S3_CACHE``, default
``~/.cache/headmaster/s3/``), work there under the usual lock, then push what changed.

The push keeps the local guarantee, "a version is complete before anything names it", for a
reader of the bucket: new and changed files of version folders go up first, then the configs
that name versions (heads, then ``threshold``, then the ensembles), then the manifest, and only
then are objects that nothing names any more deleted. Triton in explicit mode loads exactly the
version a head's config names, so a version half-uploaded is never loaded. Before anything goes
up the bucket is listed again: when another writer changed it since the pull, nothing is pushed.

Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile,
an instance role); they are never part of a URL Headmaster accepts, and no message, card or
record names them. The endpoint of a non-AWS store comes from ``AWS_ENDPOINT_URL`` or from the
URL itself in Triton's form ``s3://host:port/bucket/prefix``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from headmaster.errors import RepositoryError
from headmaster.repository.layout import CONFIG_FILE, MANIFEST, STATE_DIR
from headmaster.repository.topology import HEAD_DEPENDENT

LOG = logging.getLogger(__name__)
SCHEME = "s3://"
CACHE_ENV = "HEADMASTER_S3_CACHE"
LOCATION_FILE = "s3.json"  # in the working copy's .headmaster/: which bucket it mirrors
INDEX_FILE = "s3-index.json"  # the objects as last pulled or pushed: key -> ETag
_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-]+:\d+$")


def is_s3(repo) -> bool:
    return str(repo).startswith(SCHEME)


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/prefix`` and the endpoint that serves it (None: AWS itself)."""

    bucket: str
    prefix: str  # no leading or trailing '/'; '' for the whole bucket
    endpoint: str | None = None  # http(s)://host:port of an S3-compatible server

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """``s3://bucket/prefix`` (endpoint from AWS_ENDPOINT_URL) or Triton's
        ``s3://host:port/bucket/prefix`` (plain http) / ``s3://http(s)://host:port/bucket/prefix``."""
        if not is_s3(url):
            raise RepositoryError(f"{url!r} is not an s3:// URL", option="repo")
        rest = url[len(SCHEME) :]
        if "@" in rest:  # user:secret@host; the URL is not repeated, since it holds the secret
            raise RepositoryError(
                "an s3:// URL must not carry credentials; give them through AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY (or a profile / role)",
                option="repo",
            )
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        scheme = re.match(r"^(https?)://", rest)
        if scheme:
            rest = rest[scheme.end() :]
        first, _, rest_after = rest.partition("/")
        if scheme or _HOST_PORT.match(first):
            endpoint = f"{scheme.group(1) if scheme else 'http'}://{first}"
            rest = rest_after
        bucket, _, prefix = rest.partition("/")
        prefix = prefix.strip("/")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
            raise RepositoryError(
                f"{url!r}: expected s3://BUCKET/PREFIX (or s3://HOST:PORT/BUCKET/PREFIX); "
                f"{bucket!r} is not a bucket name",
                option="repo",
            )
        if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
            raise RepositoryError(f"{url!r}: the prefix has an empty, '.' or '..' part", option="repo")
        return cls(bucket, prefix, endpoint.rstrip("/") if endpoint else None)

    def __str__(self) -> str:
        where = self.endpoint.split("://", 1)[1] + "/" if self.endpoint else ""
        return f"{SCHEME}{where}{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")

    def triton_path(self) -> str:
        """What tritonserver's --model-repository wants: s3://[http(s)://host:port/]bucket/prefix."""
        head = f"{SCHEME}{self.endpoint}/" if self.endpoint else SCHEME
        return f"{head}{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def relative(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key


def _client(location: S3Location):
    try:
        import boto3
    except ImportError:
        raise RepositoryError("s3:// repositories need boto3: pip install 'headmaster[s3]'", option="repo") from None
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=location.endpoint,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10),
    )


def _s3_error(location: S3Location, action: str, e: Exception) -> RepositoryError:
    """One line naming the bucket and what failed; botocore's messages carry no secrets, but only
    its error code and message are kept anyway (never request headers or signatures)."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(e, NoCredentialsError):
        why = "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile / role)"
    elif isinstance(e, ClientError):
        error = e.response.get("Error", {})
        why = f"{error.get('Code', '?')}: {error.get('Message', '')}".strip()
    else:
        why = type(e).__name__ + (f": {e}" if "Endpoint" in type(e).__name__ or "Connect" in type(e).__name__ else "")
    return RepositoryError(f"cannot {action} {location}: {why}", option="repo")


def remote_objects(location: S3Location) -> dict[str, str]:
    """Relative path -> ETag of every object under the prefix."""
    client = _client(location)
    found: dict[str, str] = {}
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=location.bucket, Prefix=location.key("") if location.prefix else ""
        )
        for page in pages:
            for item in page.get("Contents", []):
                found[location.relative(item["Key"])] = item["ETag"].strip('"')
    except Exception as e:
        raise _s3_error(location, "list", e) from None
    return found


def cache_dir(location: S3Location) -> Path:
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "headmaster" / "s3")
    digest = hashlib.sha256(str(location).encode()).hexdigest()[:12]
    return root / f"{location.bucket}-{digest}"


def _local_files(folder: Path) -> dict[str, Path]:
    """The files a repository is made of: hidden paths (the state folder, the lock, staging and
    trash folders of interrupted or refused writes) stay local."""
    found = {}
    for path in Path(folder).rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file():
            found[relative.as_posix()] = path
        elif path.is_dir() and not any(path.iterdir()):
            # An ensemble's version folder is empty, and S3 has no folders: a "folder/" marker
            # object is what Triton's S3 reader then finds as that version.
            found[relative.as_posix() + "/"] = path
    return found


def _etag(path: Path) -> str:
    if path.is_dir():
        return hashlib.md5(b"", usedforsecurity=False).hexdigest()
    # Single-part uploads (all of ours: see _upload) have the MD5 of the content as ETag.
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _state(folder: Path) -> Path:
    state = Path(folder) / STATE_DIR
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    return state


def location_of(folder: Path) -> S3Location | None:
    """The bucket a working copy mirrors, or None for an ordinary repository."""
    try:
        data = json.loads((Path(folder) / STATE_DIR / LOCATION_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return S3Location(data["bucket"], data["prefix"], data.get("endpoint"))


def _write_index(folder: Path, location: S3Location, index: dict[str, str]) -> None:
    state = _state(folder)
    (state / LOCATION_FILE).write_text(
        json.dumps(
            {"bucket": location.bucket, "prefix": location.prefix, "endpoint": location.endpoint, "url": str(location)}
        )
    )
    (state / INDEX_FILE).write_text(json.dumps(index, sort_keys=True))


def _read_index(folder: Path) -> dict[str, str]:
    try:
        return json.loads((Path(folder) / STATE_DIR / INDEX_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def pull(location: S3Location, folder: Path | None = None) -> Path:
    """Make the working copy ``folder`` (default: the cache's for this location) equal the
    bucket: changed objects downloaded, files gone from the bucket deleted. Returns it."""
    from headmaster.repository.publish import repository_lock

    folder = Path(folder or cache_dir(location))
    folder.mkdir(parents=True, exist_ok=True)
    with repository_lock(folder):
        remote = remote_objects(location)
        local = _local_files(folder)
        client = _client(location)
        for relative, etag in sorted(remote.items()):
            target = folder / relative
            if relative.endswith("/"):  # a folder marker: an ensemble's empty version folder
                target.mkdir(parents=True, exist_ok=True)
                continue
            if relative in local and _etag(local[relative]) == etag:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.pull")
            try:
                client.download_file(location.bucket, location.key(relative), str(tmp))
            except Exception as e:
                raise _s3_error(location, f"download {relative} from", e) from None
            os.replace(tmp, target)
        for relative, path in local.items():
            if relative not in remote:
                path.rmdir() if relative.endswith("/") else path.unlink()
        for path in sorted(folder.rglob("*"), reverse=True):  # folders emptied by deletions
            relative = path.relative_to(folder).as_posix() + "/"
            if (
                path.is_dir()
                and not any(path.iterdir())
                and relative not in remote
                and not any(part.startswith(".") for part in path.relative_to(folder).parts)
            ):
                path.rmdir()
        _write_index(folder, location, remote)
    return folder


def _push_order(relative: str) -> int:
    """Files that name versions go up after the versions they name; the manifest last."""
    parts = relative.split("/")
    if relative == MANIFEST:
        return 4
    if parts[-1] == CONFIG_FILE and len(parts) == 2:
        model = parts[0]
        if model in HEAD_DEPENDENT:
            return 3 if model != "threshold" else 2
        return 1
    return 0


def push(
    location: S3Location, folder: Path, expected: dict[str, str] | None = None, only: set[str] | None = None
) -> list[str]:
    """Upload what differs in ``folder`` to the bucket in the order that keeps every version
    complete before a config names it, then delete what the folder no longer has. ``expected``
    (default: the working copy's index) is what the bucket held when the work began: if the bucket
    differs from it now, another writer got there first and nothing is pushed. Returns the
    relative paths uploaded or deleted."""
    folder = Path(folder)
    expected = _read_index(folder) if expected is None else expected
    remote = remote_objects(location)
    if remote != expected:
        changed = sorted(set(remote.items()) ^ set(expected.items()))
        raise RepositoryError(
            f"{location} changed while this command worked on it (another writer? e.g. "
            f"{changed[0][0]}); nothing was pushed: run the command again",
            option="repo",
        )
    local = {relative: (path, _etag(path)) for relative, path in _local_files(folder).items()}
    uploads = sorted((r for r, (_, etag) in local.items() if remote.get(r) != etag), key=lambda r: (_push_order(r), r))
    deletions = sorted(r for r in remote if r not in local)
    if only is not None:  # a first phase: just these files, nothing deleted yet
        uploads, deletions = [r for r in uploads if r in only], []
    client = _client(location)
    from boto3.s3.transfer import TransferConfig

    # One part per file (up to 5 GB), so an object's ETag is its MD5 and a pull can compare.
    single_part = TransferConfig(multipart_threshold=5 * 1024**3)
    index = dict(remote)
    for relative in uploads:
        try:
            if relative.endswith("/"):
                client.put_object(Bucket=location.bucket, Key=location.key(relative), Body=b"")
            else:
                client.upload_file(str(local[relative][0]), location.bucket, location.key(relative), Config=single_part)
        except Exception as e:
            raise _s3_error(location, f"upload {relative} to", e) from None
        index[relative] = local[relative][1]
        LOG.info("uploaded %s", relative)
    for relative in deletions:
        try:
            client.delete_object(Bucket=location.bucket, Key=location.key(relative))
        except Exception as e:
            raise _s3_error(location, f"delete {relative} from", e) from None
        index.pop(relative, None)
    _write_index(folder, location, index)
    return uploads + deletions


def sync_up(repo: Path, only: set[str] | None = None) -> list[str]:
    """After a write to a working copy: push it (nothing for an ordinary repository); ``only``:
    just those relative paths, for a change that reaches the bucket in two phases."""
    from headmaster.repository.publish import repository_lock

    location = location_of(repo)
    if location is None:
        return []
    with repository_lock(repo):  # no pull of this working copy in between (a replica starting here)
        return push(location, repo, only=only)


def describe(repo) -> str:
    """How to name a repository to a user: the bucket for a working copy (never a credential)."""
    location = location_of(repo) if not is_s3(repo) else S3Location.parse(str(repo))
    return str(location) if location is not None else str(repo)


def working_copy(repo) -> Path:
    """The folder to work on for ``--repo``: the path itself, or the fresh working copy of an
    s3:// repository."""
    if not is_s3(repo):
        return Path(repo)
    location = S3Location.parse(str(repo))
    return pull(location)


def push_repository(source: Path, url: str) -> tuple[S3Location, list[str]]:
    """``repo push``: a local repository becomes (or replaces) the one at ``url``, in the same
    order as any other push; the working copy for ``url`` is then equal to ``source``."""
    import shutil

    location = S3Location.parse(url)
    source = Path(source)
    if not (source / MANIFEST).is_file():
        raise RepositoryError(
            f"{source} is not a Headmaster repository (no {MANIFEST}); build one with `headmaster repo build`",
            option="repo",
        )
    copy = pull(location)
    from headmaster.repository.publish import repository_lock

    with repository_lock(copy):
        for relative, path in _local_files(copy).items():
            if not (source / relative).exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        for relative, path in _local_files(source).items():
            if relative.endswith("/"):
                (copy / relative).mkdir(parents=True, exist_ok=True)
                continue
            (copy / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, copy / relative)
        changed = push(location, copy)
    return location, changed
