"""Backfill a catalogue into the store on Ray Data: read and decode in parallel tasks, embed in
a pool of actors (a Triton server's ``embed`` model, or the exported encoder here), run every
live head on the embeddings, write items and labels in bounded batches.

Resumable and exactly once. Items are keyed by (sha256, encoder fingerprint): a run first
reads the hashes the store holds for the repository's encoder and skips them after reading
each image's bytes. Each write batch stores its new items, then each head's labels (each write
is all or nothing); a run killed between the two left items without some labels, so a run
first labels the stored items that lack a row of a live head version, from their stored
embeddings. Two copies of one image in a source are stored once. Unreadable images are
listed with the reason and counted, never fatal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headmaster.errors import PipelineError
from headmaster.repository.repo import Repository
from headmaster.store.base import Store, label_table

LOG = logging.getLogger(__name__)
OK, SKIP, FAILED = "ok", "skip", "failed"


@dataclass
class BackfillOptions:
    repo: Path
    server: str | None = None  # host:port of a Triton server serving the repository's encoder; None: --local
    protocol: str = "grpc"
    address: str | None = None  # an existing Ray cluster; None starts a local one
    actors: int = 1  # embedding actors
    embed_batch: int = 32  # images per actor call
    write_batch: int = 256  # items per store write (memory stays bounded by it)


@dataclass
class BackfillReport:
    total: int = 0  # URIs in the source
    skipped: int = 0  # already stored (same bytes, same encoder), or a second copy in this run
    embedded: int = 0  # new items stored
    labelled: dict[str, int] = field(default_factory=dict)  # head -> label rows written
    relabelled: int = 0  # stored items that lacked a live head's label (a run killed mid-batch)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (uri, reason)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return (self.embedded + self.skipped) / self.seconds if self.seconds else 0.0


def _read_batch(batch: dict, known: set[str], preprocessing) -> dict:
    """Ray task: read, hash, and (for local embedding) decode each URI."""
    import hashlib

    from headmaster.pipelines.sources import read_uri

    out = {"uri": [], "sha256": [], "status": [], "error": [], "data": [], "pixels": []}
    for uri in batch["uri"]:
        uri = str(uri)
        data, sha, status, error, pixels = b"", "", OK, "", None
        try:
            data = read_uri(uri)
            sha = hashlib.sha256(data).hexdigest()
        except OSError as e:
            status, error = FAILED, f"cannot read: {e.strerror or e}"
        if status == OK and sha in known:
            status, data = SKIP, b""
        if status == OK and preprocessing is not None:
            from headmaster.served.preprocess import InvalidImage, preprocess_bytes

            try:
                pixels = preprocess_bytes(data, preprocessing)
            except InvalidImage as e:
                status, error = FAILED, str(e)
            data = b""
        for key, value in zip(out, (uri, sha, status, error, data, pixels)):
            out[key].append(value)
    # Every batch the same pixel shape, even one whose images were all skipped or unreadable:
    # Ray turns blocks of unequal shapes into an object column.
    size = (preprocessing or {}).get("size") if isinstance(preprocessing, dict) else None
    shape = next((p.shape for p in out["pixels"] if p is not None), (3, *size) if size else (0,))
    out["pixels"] = np.stack([p if p is not None else np.zeros(shape, np.uint8) for p in out["pixels"]])
    out["data"] = np.array(out["data"], dtype=object)
    return {k: v if isinstance(v, np.ndarray) else np.array(v) for k, v in out.items()}


class _Embed:
    """Ray actor: one encoder (or one server connection) per actor, reused for every batch."""

    def __init__(self, repo: str, server: str | None, protocol: str):
        from headmaster.pipelines.embedders import bytes_embedder

        self.embedder = bytes_embedder(Repository(Path(repo)), server, protocol)
        self.dim = Repository(Path(repo)).card.embed_dim
        self.local = server is None

    def __call__(self, batch: dict) -> dict:
        status = batch["status"].astype(object)
        errors = batch["error"].astype(object)
        good = np.flatnonzero(status == OK)
        vectors = np.zeros((len(status), self.dim), np.float32)
        if len(good):
            if self.local:
                vectors[good] = self.embedder.embed_pixels(
                    np.stack([np.asarray(p, np.uint8) for p in batch["pixels"][good]])
                )
            else:
                for i, got in zip(good, self.embedder([bytes(batch["data"][i]) for i in good])):
                    if isinstance(got, str):
                        status[i], errors[i] = FAILED, got
                    else:
                        vectors[i] = got
        return {
            "uri": batch["uri"],
            "sha256": batch["sha256"],
            "status": np.array(status.tolist()),
            "error": np.array(errors.tolist()),
            "embedding": vectors,
        }


def _init_ray(address: str | None, actors: int) -> bool:
    """Join ``address`` or start a local cluster; False when this process was already connected."""
    import ray

    if ray.is_initialized():
        return False
    settings = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **settings)
        else:
            # Logical CPUs, not cores: each embedding actor holds one for its life, and reading
            # tasks need a slot too or the pipeline waits for ever on a 2-core machine.
            ray.init(address="local", num_cpus=actors + 2, **settings)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise PipelineError(
            f"cannot {'join the Ray cluster at ' + address if address else 'start Ray'}: {e}", option="address"
        ) from None
    return True


def _label(
    store: Store, versions, fingerprint: str, hashes: list[str], matrix: np.ndarray, report: BackfillReport
) -> None:
    for version in versions:
        scores = version.scores(matrix)
        rows = store.add_labels(
            version.card.name,
            [
                label_table(
                    hashes,
                    fingerprint,
                    version.card.version,
                    scores,
                    version.card.labels,
                    version.accepted_mask(scores),
                    "backfill",
                )
            ],
        )
        report.labelled[version.card.name] = report.labelled.get(version.card.name, 0) + rows


def _complete_labels(
    store: Store, versions, fingerprint: str, known: set[str], batch: int, report: BackfillReport
) -> None:
    """Stored items that lack a live version's label (a run killed between its two writes)."""
    for version in versions:
        missing = sorted(known - store.labelled(version.card.name, version.card.version))
        for start in range(0, len(missing), batch):
            part = store.embeddings(missing[start : start + batch], fingerprint)
            if part:
                hashes = list(part)
                _label(store, [version], fingerprint, hashes, np.stack([part[h] for h in hashes]), report)
                report.relabelled += len(hashes)


def backfill(
    source: str, store: Store, options: BackfillOptions, progress: Callable[[BackfillReport], None] | None = None
) -> BackfillReport:
    """Embed and label every image of ``source`` into ``store``; see the module docstring."""
    from headmaster.pipelines.sources import list_source
    from headmaster.repository.head_version import HeadVersion

    started = time.monotonic()
    if options.actors < 1:
        raise PipelineError(f"--actors must be at least 1, not {options.actors}", option="actors")
    repository = Repository(options.repo)
    fingerprint = repository.fingerprint
    versions = [HeadVersion.load(repository, h.name, h.live) for h in repository.heads()]
    if options.server:  # fail here, in one line, rather than inside every actor
        from headmaster.pipelines.embedders import ServerBytesEmbedder

        ServerBytesEmbedder(repository, options.server, options.protocol).close()
    uris = list_source(source)
    report = BackfillReport(total=len(uris))
    known = store.hashes(fingerprint)
    _complete_labels(store, versions, fingerprint, known, options.write_batch, report)
    if not uris:
        return report

    import ray

    started_ray = _init_ray(options.address, options.actors)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        preprocessing = None if options.server else repository.card.preprocessing
        blocks = max(options.actors * 4, min(len(uris) // options.embed_batch + 1, 1000))
        dataset = (
            ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=blocks)
            .map_batches(
                _read_batch,
                fn_kwargs={"known": known, "preprocessing": preprocessing},
                batch_size=options.embed_batch,
                num_cpus=0.5,
            )
            .map_batches(
                _Embed,
                fn_constructor_kwargs={
                    "repo": str(repository.path),
                    "server": options.server,
                    "protocol": options.protocol,
                },
                compute=ray.data.ActorPoolStrategy(size=options.actors),
                num_cpus=1,
                batch_size=options.embed_batch,
            )
        )
        seen = set(known)
        for batch in dataset.iter_batches(batch_size=options.write_batch, batch_format="numpy"):
            keep = []
            for i, (uri, sha, status, error) in enumerate(
                zip(batch["uri"], batch["sha256"], batch["status"], batch["error"])
            ):
                if status == FAILED:
                    report.failures.append((str(uri), str(error)))
                elif status == SKIP or sha in seen:
                    report.skipped += 1
                else:
                    seen.add(sha)
                    keep.append(i)
            if keep:
                hashes = [str(batch["sha256"][i]) for i in keep]
                matrix = np.asarray(batch["embedding"][keep], np.float32)
                store.add_embeddings(hashes, [str(batch["uri"][i]) for i in keep], fingerprint, matrix)
                _label(store, versions, fingerprint, hashes, matrix, report)
                report.embedded += len(keep)
            report.seconds = time.monotonic() - started
            if progress:
                progress(report)
    finally:
        if started_ray:
            ray.shutdown()
    report.seconds = time.monotonic() - started
    return report
