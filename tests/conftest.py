"""Shared fixtures: one exported encoder, one repository, one real Triton server per session.

The encoder is open_clip's ViT-S-32 architecture with random weights (seed 0): no model hub
is reachable here, and random weights exercise the same graphs as pretrained ones. Tests whose
subject is not the encoder use a tiny CLIP of the same code instead (``tiny_encoder_dir``,
``tiny_repo``: tests.helpers.TINY_MODEL), which the fast tier exports in place of ViT-S-32.
Images are real photos that ship inside scikit-image and scikit-learn.
"""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    ARTIFACTS,
    FLAVOUR,
    MODEL,
    NATIVE,
    NATIVE_BACKENDS,
    NATIVE_TRITON,
    SEED,
    TINY_MODEL,
    WORKER,
    build_repo,
    photo_bytes,
    start_server,
)

# No test reaches a model hub: with transformers installed (the hf extra), a Hugging Face
# tokenizer or model not in the local cache would otherwise be fetched with retries for minutes
# before failing. Subprocesses (the CLI, tritonserver) inherit it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_report_header(config):
    if NATIVE:
        return (
            f"headmaster: native tier: flavour {FLAVOUR}, tritonserver {NATIVE_TRITON or '(bundled)'}, "
            f"backends {NATIVE_BACKENDS}"
        )
    return None


# -- tiers by cost, not by folder -----------------------------------------------------------------
# pure: no Triton, nothing shared on disk (in memory, or small files under its own tmp_path).
# disk: real artifacts built once and shared (an exported encoder, a repository, the digits, a
#   module's own exports: anything made through tmp_path_factory) or a real PostgreSQL / Redis; no Triton.
# server: starts or uses a real Triton.  slow: over ~5 s of CPU on 2 cores (a full ViT export, real
#   weights, worker processes, FiftyOne, Label Studio; marked by hand, the figure in a comment).
# The fast tier is `pytest -m "not server and not slow"`.

# Fixtures that start a Triton server, or hand one out: a test using one, directly or through
# another fixture, is in the server tier. A test that starts one itself (start_server,
# TritonServer, `headmaster serve`) carries `@pytest.mark.server`; the guard below fails one that
# does not, so the fast tier never starts a server by mistake.
SERVER_FIXTURES = frozenset(
    {
        "server",  # the session's (below)
        "ab_server",
        "cache_served",
        "convnext_served",
        "lite0_served",
        "live_server",
        "ood_setup",
        "replicas",
        "served",
        "store_server",
        "taught",
        "tasks",
        "text_served",
        "torchvision_server",  # one module's own (tests/scenarios/)
    }
)
# Real services other than Triton.
DISK_FIXTURES = frozenset({"tmp_path_factory", "postgres_url", "redis_url", "label_studio_process"})


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these markers
def pytest_collection_modifyitems(config, items):
    """Each test gets one cost tier from the fixtures it uses (see above), unless it names one
    itself; tests marked ``portable_only(reason)`` skip on the native tier, saying why."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("server") is None and fixtures & SERVER_FIXTURES:
            item.add_marker(pytest.mark.server)
        if not any(item.get_closest_marker(tier) for tier in ("server", "disk", "pure")):
            item.add_marker(pytest.mark.disk if fixtures & DISK_FIXTURES else pytest.mark.pure)
        marker = item.get_closest_marker("portable_only")
        if NATIVE and marker:
            item.add_marker(pytest.mark.skip(reason="portable flavour only: " + " ".join(marker.args)))


# The guard: a test outside the server tier that starts tritonserver (in this process) or
# `headmaster serve` / `quickstart` (in a subprocess) fails, saying how to mark it.
_running: list[pytest.Item] = []  # the test whose setup, call or teardown runs now
_popen_init = subprocess.Popen.__init__


def _starts_triton(args) -> bool:
    argv = [os.fsdecode(a) for a in args] if isinstance(args, (list, tuple)) else [os.fsdecode(args)]
    if not argv:
        return False
    if os.path.basename(argv[0]) == "tritonserver":
        return True
    headmaster = os.path.basename(argv[0]) == "headmaster" or any("headmaster.cli" in a for a in argv)
    return headmaster and ("serve" in argv or "quickstart" in argv)


def _guarded_popen_init(self, args, *rest, **kwargs):
    if _running and _running[-1].get_closest_marker("server") is None and _starts_triton(args):
        pytest.fail(
            f"{_running[-1].nodeid} starts a Triton server ({' '.join(map(str, args))[:120]}) but is not "
            "in the server tier: mark it @pytest.mark.server, or add the fixture that starts it to "
            "SERVER_FIXTURES in tests/conftest.py",
            pytrace=False,
        )
    _popen_init(self, args, *rest, **kwargs)


def pytest_configure(config):
    subprocess.Popen.__init__ = _guarded_popen_init


def pytest_unconfigure(config):
    subprocess.Popen.__init__ = _popen_init


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running.append(item)
    try:
        yield
    finally:
        _running.pop()


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    return photo_bytes()


@pytest.fixture(scope="session")
def jpeg_photos(photos) -> dict[str, bytes]:
    """The same photos re-encoded as JPEG (what most clients send)."""
    from PIL import Image

    out = {}
    for name, data in photos.items():
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(buffer, "JPEG", quality=90)
        out[name.rsplit(".", 1)[0] + ".jpg"] = buffer.getvalue()
    return out


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory) -> Path:
    """The session's ViT-S-32 export (14-16 s of CPU). Under xdist the workers share one: the first
    to take the lock exports it into the run's temp folder (the parent of each worker's own), the
    others wait for it. Sharing it between workers is as safe as sharing it between the tests of one
    session, which they already do: no test writes into it."""
    from headmaster.export.encoder import ExportOptions, export_encoder

    if WORKER is None:
        out = tmp_path_factory.mktemp("encoder") / "vit-s-32"
        export_encoder(ExportOptions(model=MODEL, pretrained=None, out=out, seed=SEED))
        return out
    shared = tmp_path_factory.getbasetemp().parent / "encoder"
    shared.mkdir(exist_ok=True)
    out, done = shared / "vit-s-32", shared / "done"
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or if this worker dies
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # a worker that died mid-export left a part
            export_encoder(ExportOptions(model=MODEL, pretrained=None, out=out, seed=SEED))
            done.touch()
    return out


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """The tiny CLIP (tests.helpers.TINY_MODEL), random weights (seed 0), both towers: where the
    encoder is not what a test is about."""
    from headmaster.export.encoder import ExportOptions, export_encoder

    out = tmp_path_factory.mktemp("encoder") / "tiny-clip"
    export_encoder(ExportOptions(model=TINY_MODEL, pretrained=None, out=out, seed=SEED))
    return out


@pytest.fixture(scope="session")
def open_clip_model():
    """The same random-weight model, straight from open_clip, with open_clip's own transform:
    the independent reference for served embeddings."""
    import open_clip
    import torch

    torch.manual_seed(SEED)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer(MODEL)


@pytest.fixture(scope="session")
def repo(encoder_dir, tmp_path_factory) -> Path:
    return build_repo(
        encoder_dir,
        tmp_path_factory.mktemp("repo") / "model_repository",
        max_queue_delay_us=20000,
        preferred_batch_sizes=(4, 8),
        serve_text=True,  # the session server's embed_text, tokenize and text_encoder are tested
    )


@pytest.fixture(scope="session")
def tiny_repo(tiny_encoder_dir, tmp_path_factory) -> Path:
    """The session repository's twin on the tiny encoder (same options, same zero-shot heads), for
    tests of the repository's files that need no server and no ViT-S-32."""
    return build_repo(
        tiny_encoder_dir,
        tmp_path_factory.mktemp("tiny-repo") / "model_repository",
        max_queue_delay_us=20000,
        preferred_batch_sizes=(4, 8),
        serve_text=True,
    )


@pytest.fixture(scope="session")
def server(repo):
    server = start_server(repo, ARTIFACTS)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn's 1,797 labelled 8x8 digits, written as PNG files, one folder per digit."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits") / "digits"
    digits = load_digits()
    for i, (image, target) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(target)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8), "L").save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def embedding_cache(tmp_path_factory) -> Path:
    """One embedding cache for the session: each digit image is embedded once."""
    return tmp_path_factory.mktemp("embedding-cache")


@pytest.fixture
def cli():
    """``cli(*args)``: the `headmaster` command run in this process, returning what
    ``tests.helpers.run_cli`` returns (a CompletedProcess with the exit code, stdout and stderr).
    A subprocess imports torch, open_clip, ... again: 3-7 s of CPU a call, most of what a test
    of an error message costs. Every command path keeps a subprocess test (run_cli) elsewhere,
    which checks the entry point as a user runs it; this one is for the behaviour behind it.
    Unlike a subprocess, Python warnings go to pytest's summary, not to stderr."""
    import contextlib
    import logging
    import sys

    from headmaster.cli import common, main

    def run(*args) -> subprocess.CompletedProcess:
        argv = ["headmaster", *map(str, args)]
        stdout, stderr = io.StringIO(), io.StringIO()
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        consoles = [(c, c._file, c._color_system) for c in (common.console, common.out)]
        try:
            # As in a subprocess with pipes: no colours, the consoles' text in stdout and stderr.
            for console, buffer in zip((common.console, common.out), (stderr, stdout)):
                console.file, console._color_system = buffer, None
            # pytest's own handlers out of the way, so that the command's logging.basicConfig puts
            # its handler (to the console, so to stderr) in place, as in a process of its own.
            root.handlers[:] = []
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                old_argv, sys.argv = sys.argv, argv
                try:
                    main()
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                finally:
                    sys.argv = old_argv
        finally:
            for console, file, color in consoles:
                console._file, console._color_system = file, color
            root.handlers[:], root.level = handlers, level
        return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())

    return run
