"""Every fenced code block of README.md and of the docs/ pages runs as a test, verbatim (issue 9).

README.md and the docs/ pages it links (in the order it first links them; a page it does not
link fails, so no page goes unread) are read when the tests are collected and run (never a
copy): each fenced block
(```bash, ```python, ```text and any other) becomes one test, named after the heading above
it. A new block nobody wrote a check for still runs (bash and python: exit 0), and a block of
another kind fails until a check for it is added here.

The world the examples assume is built in a temp folder, as a user's checkout would have it:

- ``model_repository/`` (the default ``--repo``) built from the session's exported encoder
  (ViT-S-32, random weights) with one zero-shot head, ``animal`` (cat, dog, bird); ``has_cat``
  is made by the README's own "zero-shot first, then trained" block, so its version comments
  (v1 zero-shot, v2 trained) can be checked as written;
- the files the examples name: ``photo.jpg``, ``cat.jpg``, ``dog.png`` (real photos shipped in
  scikit-image / scikit-learn, under those names), ``photos/animal/{cat,dog,bird}/`` and
  ``photos/has_cat/{cat,no cat}/`` (scikit-learn's digits written as PNG: 0 = cat, 1 = dog,
  2 = bird, in every folder), and ``.venv`` (a link to this venv, for ``.venv/bin/headmaster``);
- ``headmaster`` on PATH (this venv's ``bin/`` first), ``XDG_CACHE_HOME`` inside the folder (so
  ``train-head`` embeds for real instead of reading a cache of an earlier run);
- ``headmaster serve --repo model_repository`` (the real command, a subprocess, in that folder)
  on the default ports 8000 / 8001 / 8002 when they are free. When one is taken, the server
  starts on free ports and ``localhost:8000`` / ``localhost:8001`` in the examples are replaced
  by its HTTP / gRPC addresses, and ``localhost:8002`` by its metrics address (``127.0.0.1:...``
  likewise): the only substitution in the blocks that run against the server.
  A block that relies on a default port without naming it (``headmaster classify`` with no
  ``--url``) is then skipped, saying why. The server is stopped with SIGTERM at the end, and
  must exit 0.

Blocks (or lines) that cannot run here as written are covered as close to the original as
this machine allows, each saying so:

- ``make quickstart`` runs what its recipe runs after setup, ``.venv/bin/headmaster
  quickstart`` (checked against the Makefile), with ``--workdir`` in a temp folder;
  ``make test`` is CI itself (this suite): skipped with that reason.
- ``--pretrained laion2b_s34b_b79k`` needs a model hub, which no machine here reaches: it must
  fail with one ``error:`` line and no traceback. It runs in the background from the start of
  the module (huggingface_hub retries for about a minute before it gives up).
- ``--pretrained /path/to/open_clip_checkpoint.pt``: a real checkpoint file (the state_dict of
  a random-weight ViT-B-32, seed 1, saved with ``torch.save``) replaces the placeholder path.
  The example names no ``--model``, so it runs the default ViT-B-32, as a user would (about a
  minute here); the exported card must hold that file's weights.
- The synopsis under "## Command line" is a reference, not a script (```text): every command
  and every ``--option`` it names must exist in ``headmaster <command> --help``.
- The architecture diagram (```text): every model and tensor it names must exist in the
  repository, in the ensemble's order.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import ARTIFACTS, ZERO_SHOT, Ports, build_repo, free_port, photo_bytes, subset

# The examples run `headmaster serve` as written: the bundled Triton, python backend only.
pytestmark = [
    pytest.mark.portable_only("the README's examples run `headmaster serve`, the bundled Triton"),
    pytest.mark.server,
]  # the blocks reach the served world through request.getfixturevalue

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
VENV_BIN = Path(sys.executable).parent
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
CHECKPOINT_PLACEHOLDER = "/path/to/open_clip_checkpoint.pt"
TIMEOUT = 420


# ---------------------------------------------------------------------------------------------
# The blocks


@dataclass(frozen=True)
class Block:
    heading: str
    lang: str
    code: str
    line: int  # of the opening fence
    slug: str
    source: str = "README.md"  # the file it is in: README.md or docs/PAGE.md

    @property
    def commands(self) -> list[str]:
        """Shell lines with their comments, continuation lines joined."""
        out, current = [], ""
        for line in self.code.splitlines():
            current += line
            if current.endswith("\\"):
                current = current[:-1]
                continue
            if current.strip() and not current.lstrip().startswith("#"):
                out.append(current.strip())
            current = ""
        return out


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def file_blocks(source: str, text: str) -> list[Block]:
    blocks, heading, fence, lang, start, lines = [], "", None, "", 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if fence is None:
            m = re.match(r"^(```+|~~~+)\s*([\w+-]*)", line)
            if m:
                fence, lang, start, lines = m.group(1), m.group(2).lower(), number, []
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif line.strip() == fence:
            blocks.append(Block(heading, lang, "\n".join(lines) + "\n", start, "", source))
            fence = None
        else:
            lines.append(line)
    assert fence is None, f"{source}: the fence opened on line {start} is never closed"
    return blocks


def doc_files() -> list[Path]:
    """README.md, then the docs/ pages in the order the README links them (the examples build on
    each other: a head trained on one page is rolled back on a later one)."""
    linked = re.findall(r"\]\((docs/[\w-]+\.md)\)", README.read_text())
    pages = [ROOT / name for name in dict.fromkeys(linked)]
    unlinked = sorted(str(p.relative_to(ROOT)) for p in set(DOCS.glob("*.md")) - set(pages))
    assert not unlinked, f"docs pages the README does not link (so nobody finds them): {unlinked}"
    missing = [str(p.relative_to(ROOT)) for p in pages if not p.is_file()]
    assert not missing, f"the README links docs pages that do not exist: {missing}"
    return [README, *pages]


def readme_blocks(text: str | None = None) -> list[Block]:
    """Every fenced block of README.md and the docs pages (or of ``text`` alone), named."""
    sources = (
        [("README.md", text)]
        if text is not None
        else [(str(path.relative_to(ROOT)), path.read_text()) for path in doc_files()]
    )
    blocks: list[Block] = []
    for source, content in sources:
        blocks += file_blocks(source, content)
    # ids: the heading's slug; with the block's language when the heading has several blocks
    per_heading: dict[str, int] = {}
    for block in blocks:
        per_heading[block.heading] = per_heading.get(block.heading, 0) + 1
    named, seen = [], set()
    for block in blocks:
        slug = slugify(block.heading) or "top"
        if per_heading[block.heading] > 1:
            slug += f"-{block.lang or 'plain'}"
        base, n = slug, 1
        while slug in seen:
            n += 1
            slug = f"{base}-{n}"
        seen.add(slug)
        named.append(Block(block.heading, block.lang, block.code, block.line, slug, block.source))
    return named


def cases() -> list:
    """One case per block; the blocks whose lines need different treatment give one per line."""
    out = []
    for block in readme_blocks():
        if block.lang in ("bash", "sh", "shell", "console") and any(
            c.startswith(("make ", ".venv/bin/headmaster quickstart")) for c in block.commands
        ):
            for command in block.commands:
                out.append(pytest.param(block, command, id=f"{block.slug}--{slugify(command.split('#')[0])}"))
        else:
            out.append(pytest.param(block, None, id=block.slug))
    return out


# ---------------------------------------------------------------------------------------------
# The world the examples assume


def port_free(port: int) -> bool:
    for host in ("127.0.0.1", "::1"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((host, port))
        except OSError as e:
            if family == socket.AF_INET6 and e.errno in (97, 99):  # no IPv6 here
                continue
            return False
    return True


@dataclass
class World:
    root: Path
    env: dict[str, str]
    ports: dict[str, int] = field(default_factory=dict)
    serve: subprocess.Popen | None = None
    serve_log: Path | None = None
    hub_attempt: subprocess.Popen | None = None
    hub_started: float = 0.0
    hub_log: Path | None = None

    @property
    def repo(self) -> Path:
        return self.root / "model_repository"

    @property
    def default_ports(self) -> bool:
        return self.ports == DEFAULT_PORTS

    def substitute(self, code: str) -> str:
        """The one substitution: the server's addresses, when it could not take the default ports."""
        for host in ("localhost", "127.0.0.1"):
            code = (
                code.replace(f"{host}:8000", f"{host}:{self.ports['http']}")
                .replace(f"{host}:8001", f"{host}:{self.ports['grpc']}")
                .replace(f"{host}:8002", f"{host}:{self.ports['metrics']}")
            )
        return code

    def bash(self, code: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", code],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def python(self, code: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", code], cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def classify(self, image: Path) -> dict:
        """What the running server answers for one image (plain KServe v2 JSON)."""
        import base64

        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "IMAGE",
                        "shape": [1, 1],
                        "datatype": "BYTES",
                        "data": [base64.b64encode(image.read_bytes()).decode()],
                    }
                ],
                "outputs": [{"name": "RESULT"}],
            }
        ).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.ports['http']}/v2/models/classify/infer", body)
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(json.loads(response.read())["outputs"][0]["data"][0])


def write_jpeg(data: bytes, path: Path) -> None:
    from PIL import Image

    Image.open(io.BytesIO(data)).convert("RGB").save(path, "JPEG", quality=90)


@pytest.fixture(scope="module")
def world(encoder_dir, digits_dir, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("readme") / "checkout"
    root.mkdir()
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "XDG_CACHE_HOME": str(root / ".cache"),
        "COLUMNS": "200",
    }
    env.pop("HEADMASTER_API_KEY", None)
    env.pop("HEADMASTER_STORE", None)
    world = World(root, env)
    (root / ".venv").symlink_to(VENV_BIN.parent)
    build_repo(encoder_dir, world.repo, heads={"animal": ZERO_SHOT["animal"]})

    photos = photo_bytes()
    write_jpeg(photos["china.jpg"], root / "photo.jpg")
    write_jpeg(photos["chelsea.png"], root / "cat.jpg")
    (root / "dog.png").write_bytes(photos["astronaut.png"])
    subset(digits_dir, root / "photos" / "animal", {"0": 20, "1": 20, "2": 20}, {"0": "cat", "1": "dog", "2": "bird"})
    has_cat = root / "photos" / "has_cat"
    for digit, folder, first, count in (("0", "cat", 20, 12), ("1", "no cat", 20, 6), ("2", "no cat", 20, 6)):
        (has_cat / folder).mkdir(parents=True, exist_ok=True)
        for path in sorted((digits_dir / digit).glob("*.png"))[first : first + count]:
            shutil.copy(path, has_cat / folder / path.name)

    # The hub example runs beside the rest.
    hub = next((c for b in readme_blocks() for c in b.commands if "--pretrained laion2b_s34b_b79k" in c), None)
    if hub is not None:
        world.hub_log = root.parent / "hub-attempt.log"
        world.hub_started = time.time()  # wall clock: compared with the log's last write below
        hub_root = root.parent / "hub-checkout"
        hub_root.mkdir()
        (hub_root / ".venv").symlink_to(VENV_BIN.parent)
        # Offline, as every machine here is: huggingface_hub must not even try the network (tests
        # talk to loopback only), so it fails at once instead of after a minute of retries.
        world.hub_attempt = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", hub.split("#")[0]],
            cwd=hub_root,
            env={**env, "HF_HUB_OFFLINE": "1"},
            stdout=open(world.hub_log, "w"),
            stderr=subprocess.STDOUT,
        )
    yield world
    if world.hub_attempt is not None and world.hub_attempt.poll() is None:
        world.hub_attempt.send_signal(signal.SIGTERM)
        world.hub_attempt.wait(30)
    if world.serve is not None and world.serve.poll() is None:
        world.serve.send_signal(signal.SIGTERM)
        world.serve.wait(60)
    shutil.rmtree(root.parent, ignore_errors=True)  # a checkpoint and an export: over a gigabyte


@pytest.fixture(scope="module")
def served(world) -> World:
    """`headmaster serve --repo model_repository` running in the world's folder."""
    from headmaster.server.record import running_server

    if all(port_free(p) for p in DEFAULT_PORTS.values()):
        world.ports = dict(DEFAULT_PORTS)
        extra: list[str] = []
    else:
        world.ports = {name: free_port() for name in DEFAULT_PORTS}
        extra = Ports(**world.ports).options()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    world.serve_log = ARTIFACTS / "readme-serve.log"
    world.serve = subprocess.Popen(
        ["headmaster", "serve", "--repo", "model_repository", *extra],
        cwd=world.root,
        env=world.env,
        stdout=open(world.serve_log, "w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while running_server(world.repo) is None:
        assert world.serve.poll() is None, world.serve_log.read_text()
        assert time.monotonic() < deadline, f"serve did not become ready:\n{world.serve_log.read_text()}"
        time.sleep(0.5)
    return world


def ran(result: subprocess.CompletedProcess, code: str) -> str:
    """Assert exit 0; the output (stdout + stderr)."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"exit {result.returncode} from:\n{code}\n--- output:\n{output}"
    return output


def head_state(world: World, name: str):
    from headmaster.export.heads import HeadCard
    from headmaster.repository.repo import Repository

    state = next(s for s in Repository(world.repo).heads() if s.name == name)
    cards = {v: HeadCard.load(world.repo / name / str(v)) for v in state.versions}
    return state, cards


# ---------------------------------------------------------------------------------------------
# Checks, one per kind of block


def check_diagram(block: Block, world: World) -> None:
    """The diagram names real models and tensors, in the ensemble's order."""
    text = block.code
    models = ["preprocess", "image_encoder", "threshold"]
    tensors = ["IMAGE", "EMBEDDING", "SCORES", "INFO", "RESULT"]
    for name in models + tensors:
        assert re.search(rf"\b{name}\b", text), f"the diagram no longer names {name}: update this check"
    for name in models:
        assert (world.repo / name / "config.pbtxt").is_file(), f"the diagram names a model {name} the repository lacks"
    classify = (world.repo / "classify" / "config.pbtxt").read_text()
    steps = re.findall(r'model_name:\s*"([^"]+)"', classify)
    assert [s for s in steps if s in models] == models, f"classify's steps: {steps}"
    assert steps.index("animal") > steps.index("image_encoder") and steps.index("animal") < steps.index("threshold")
    for tensor in ("IMAGE", "EMBEDDING", "RESULT"):
        assert f'"{tensor}"' in classify, f"classify has no tensor {tensor}"
    head = (world.repo / "animal" / "config.pbtxt").read_text()
    for tensor in ("EMBEDDING", "SCORES", "INFO"):
        assert f'"{tensor}"' in head, f"a head has no tensor {tensor}"


def help_text(*command: str) -> str:
    result = subprocess.run(
        ["headmaster", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "COLUMNS": "300",
            "NO_COLOR": "1",
            "TERM": "dumb",
        },
    )
    assert result.returncode == 0, f"headmaster {' '.join(command)} --help failed:\n{result.stdout}{result.stderr}"
    return result.stdout


def subcommands(help_output: str) -> set[str]:
    names, inside = set(), False
    for line in help_output.splitlines():
        if re.match(r"^\W*Commands\W", line.strip("╭─ ")) or "─ Commands ─" in line:
            inside = True
            continue
        if inside:
            m = re.match(r"^[│|]\s+([a-z][\w-]*)\s", line)
            if m:
                names.add(m.group(1))
            elif line.startswith(("╰", "+")):
                inside = False
    return names


def unknown_options(entries: list[str]) -> list[str]:
    """The commands and --options of these `headmaster ...` lines that its --help does not know."""
    helps: dict[tuple, str] = {}

    def help_of(path: tuple) -> str:
        if path not in helps:
            helps[path] = help_text(*path)
        return helps[path]

    problems = []
    for entry in entries:
        words = entry.split()[1:]
        path: tuple = ()
        while words and words[0] in subcommands(help_of(path)):
            path += (words.pop(0),)
        if not path:
            problems.append(f"{entry.split()[1]!r} is not a headmaster command ({entry})")
            continue
        text = help_of(path)
        for option in sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", entry))):
            if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text):
                problems.append(f"headmaster {' '.join(path)} has no {option}")
    return problems


LABEL_STUDIO_TEST = ROOT / "tests" / "scenarios" / "test_label_studio.py"


def check_label_studio_block(block: Block) -> None:
    """The Label Studio block needs a Label Studio server and people labelling in it: it is
    covered by tests/scenarios/test_label_studio.py, which starts label-studio with the same
    options and runs the same commands against it. Here: every headmaster command and option
    exists, and every label-studio option is one that test starts it with."""
    text = re.sub(r"\\\n\s*", " ", block.code)  # continuation lines joined
    commands = [
        c.strip().rstrip("&").strip() for c in text.splitlines() if c.strip() and not c.lstrip().startswith("#")
    ]
    lines = " ".join(commands)
    entries = [c[c.index("headmaster ") :] for c in commands if "headmaster " in c]
    assert entries, block.code
    problems = unknown_options(entries)
    assert not problems, f"{block.source} line {block.line} names what does not exist:\n" + "\n".join(problems)
    test = LABEL_STUDIO_TEST.read_text()
    start = next(c for c in commands if "label-studio start" in c)
    for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", start):
        assert f'"{option}"' in test, f"{LABEL_STUDIO_TEST.name} does not start label-studio with {option}"
    for needed in ("--label-studio-url", "--label-studio-project", "--project"):
        if needed in lines:
            assert f'"{needed}"' in test, f"{LABEL_STUDIO_TEST.name} never runs a command with {needed}"


def check_synopsis(block: Block) -> None:
    """Every command and --option of the reference exists in that command's --help."""
    assert block.lang == "text", "the command-line synopsis is a reference, not a script: fence it as ```text"
    entries: list[str] = []
    for line in block.code.splitlines():
        if line.startswith("headmaster "):
            entries.append(line)
        elif line.strip() and entries:
            entries[-1] += " " + line.strip()  # an indented continuation of the command above
    assert len(entries) >= 15, entries
    problems = unknown_options(entries)
    assert not problems, "the synopsis names what does not exist:\n" + "\n".join(problems)


def check_cache_hits(output: str) -> None:
    """The same image classified twice: each cache's metric line the block greps counts at least
    that hit (the second request skipped decode, so preprocess's cache answered it)."""
    for series in ("headmaster_decoded_cache_hits_total{", "headmaster_embedding_cache_hits_total{"):
        line = next((x for x in output.splitlines() if x.startswith(series)), None)
        assert line is not None, output
        assert float(line.split()[-1]) >= 1, line


def check_curl(output: str, world: World) -> None:
    answer = json.loads(output)
    assert answer["model_name"] == "classify", answer
    assert answer["outputs"][0]["name"] == "RESULT", answer
    assert answer["outputs"][0]["datatype"] == "BYTES" and answer["outputs"][0]["shape"] == [1, 1]
    result = json.loads(answer["outputs"][0]["data"][0])
    from headmaster.repository.repo import Repository

    assert result["encoder"] == Repository(world.repo).fingerprint
    assert set(result["heads"]["animal"]["scores"]) == {"cat", "dog", "bird"}, result


def check_shared_memory(output: str, block: Block) -> None:
    images = re.findall(r'"([^"]+\.(?:jpg|png))"', block.code)
    assert ast.literal_eval(output.strip()) == [(384,)] * len(images), output  # ViT-S-32's embedding, per image
    assert not list(Path("/dev/shm").glob("headmaster-*")), "the client left a shared-memory region behind"


def check_client(output: str, block: Block, world: World) -> None:
    images = re.findall(r'"([^"]+\.(?:jpg|png))"', block.code)
    lines = [line for line in output.splitlines() if line.strip()]
    assert [line.split()[0] for line in lines] == images, output  # one line per image, in order
    state, _ = head_state(world, "animal")
    for line in lines:
        assert "failed:" not in line, line
        m = re.match(r"^\S+ (\(.*\)) (\d+) \((\d+),\)$", line)  # labels: a tuple
        assert m, f"not `source labels version shape`: {line!r}"
        assert set(ast.literal_eval(m.group(1))) <= {"cat", "dog", "bird"}, line
        assert int(m.group(2)) == state.live, line
        assert int(m.group(3)) == 384, line  # ViT-S-32's embedding


def check_training(output: str, block: Block, world: World, before) -> None:
    name = re.search(r"--name (\w+)", block.code).group(1)
    state, cards = head_state(world, name)
    assert state.live == max(state.versions) and state.live not in before, (state, before)
    card = cards[state.live]
    assert card.kind == "linear" and set(card.labels) == {"cat", "dog", "bird"}, card
    assert f"v{state.live}" in output or f"version {state.live}" in output, output
    # hot-loaded: the running server answers with the new version
    assert world.classify(world.root / "photo.jpg")["heads"][name]["version"] == state.live


def check_zero_shot_story(output: str, world: World) -> None:
    """The comments of the block, as written: v1 zero-shot, v2 trained (linear) and live, then back to v1."""
    time.sleep(6)  # serve's watcher scans every 2 s: a rollback must still hold after a few scans
    state, cards = head_state(world, "has_cat")
    assert state.versions == [1, 2] or tuple(state.versions) == (1, 2), state
    assert cards[1].kind == "zero-shot" and cards[2].kind == "linear", (cards[1].kind, cards[2].kind)
    assert cards[2].labels == ("cat", "no cat") or list(cards[2].labels) == ["cat", "no cat"]
    adopted = [line for line in world.serve_log.read_text().splitlines() if line.startswith("adopted")]
    assert state.live == 1, f"rollback should have made v1 live again; serve's watcher says: {adopted}"
    assert "has_cat" in output
    assert world.classify(world.root / "cat.jpg")["heads"]["has_cat"]["version"] == 1


def check_store(output: str, block: Block, world: World, before) -> None:
    from headmaster.store import ParquetStore

    store = ParquetStore(world.root / "store")
    images = sorted(p for p in (world.root / "photos").rglob("*.png"))
    stored = store.uris()
    assert len(stored) == len({hashlib.sha256(p.read_bytes()).hexdigest() for p in images}), len(stored)
    # the second classify: every image from its stored embedding
    assert re.search(rf"0 embedded, {len(stored)} from stored embeddings", output), output
    rows = list(csv.DictReader(open(world.root / "to_label.csv")))
    assert 0 < len(rows) <= 50 and {r["label"] for r in rows} <= {"cat", "dog", "bird"}, rows[:3]
    assert len({r["label"] for r in rows}) >= 2
    state, cards = head_state(world, "animal")
    new = sorted(set(state.versions) - set(before))
    assert len(new) == 2 and state.live == new[-1], (state, before)  # train-head folders, then train-head --store
    from_store = json.dumps(cards[new[-1]].details)
    assert "snapshot" in from_store, cards[new[-1]].details
    assert list((world.root / "store" / "snapshots" / "animal").glob("v1/manifest.jsonl"))
    manifest = (world.root / "store" / "snapshots" / "animal" / "v1" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == len(rows), (len(manifest), len(rows))  # exactly the people's labels
    assert world.classify(world.root / "photo.jpg")["heads"]["animal"]["version"] == state.live


# ---------------------------------------------------------------------------------------------
# The tests


def check_perf_analyzer(output: str, block: Block) -> None:
    """Each perf_analyzer line measured `classify` (no key: the model's config is open to it)."""
    runs = [c for c in block.commands if "perf_analyzer -m classify" in c]
    measured = re.findall(r"Concurrency: 1, throughput: ([0-9.]+) infer/sec", output)
    assert len(measured) == len(runs) == 2 and all(float(t) > 0 for t in measured), output[-3000:]
    assert "restricted" not in output and "failed" not in output.lower(), output[-3000:]


def make_quickstart(command: str, world: World, tmp_path: Path) -> None:
    recipe = re.search(r"^quickstart:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert recipe and recipe.group(1).strip() == "$(VENV)/bin/headmaster quickstart", (
        "make quickstart no longer runs `.venv/bin/headmaster quickstart`: update this test"
    )
    code = f".venv/bin/headmaster quickstart --workdir {tmp_path / 'quickstart'}"
    output = ran(world.bash(code), code)
    check_quickstart(output, tmp_path / "quickstart")
    assert "random weights" in output


def check_quickstart(output: str, workdir: Path) -> None:
    assert re.search(r"(\d+) of \1 images classified", output), output
    results = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    assert len(results) == 6 and all(set(r["heads"]) == {"subject", "has_cat"} for r in results), results[:1]
    assert re.search(r"6 stored embeddings rescored by has_cat v1", output), output


def state_dict_sha256(state_dict) -> str:
    """The weights hash the encoder card records, computed here over the checkpoint's own tensors."""
    import torch

    digest = hashlib.sha256()
    for key, tensor in sorted(state_dict.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(t.dtype).encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def quickstart_checkpoint(command: str, world: World) -> None:
    import open_clip
    import torch

    model = re.search(r"--model (\S+)", command)
    model = model.group(1) if model else "ViT-B-32"  # quickstart's default
    checkpoint = world.root / "checkpoints" / "open_clip_checkpoint.pt"
    checkpoint.parent.mkdir(exist_ok=True)
    torch.manual_seed(1)
    state = open_clip.create_model(model, pretrained=None).state_dict()
    torch.save(state, checkpoint)
    expected = state_dict_sha256(state)
    del state
    code = command.split("#")[0].replace(CHECKPOINT_PLACEHOLDER, str(checkpoint))
    output = ran(world.bash(code), code)
    workdir = world.root / "build" / "quickstart"
    check_quickstart(output, workdir)
    card = json.loads((workdir / "encoder" / "card.json").read_text())
    assert card["model"] == model and card["pretrained"] == str(checkpoint), card
    assert card["weights_sha256"] == expected, "the export does not hold the checkpoint's weights"
    assert "random weights" not in output


def quickstart_from_hub(world: World) -> None:
    assert world.hub_attempt is not None
    code = world.hub_attempt.wait(240)
    # How long the attempt itself ran (its log's last write), not how long the blocks before this
    # one took: the attempt runs beside them from the start of the module.
    elapsed = world.hub_log.stat().st_mtime - world.hub_started
    output = world.hub_log.read_text()
    assert code == 1, output
    assert "Traceback" not in output, output
    last = [line for line in output.splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and "laion2b_s34b_b79k" in last, output
    assert len([line for line in output.splitlines() if line.startswith("error:")]) == 1, output
    assert elapsed < 120, f"took {elapsed:.0f} s to fail offline"


@pytest.mark.parametrize("block, command", cases())
def test_readme_block(block: Block, command: str | None, request, tmp_path):
    """One fenced block of README.md or a docs page, as a user runs it."""
    current = {(b.source, b.line): b for b in readme_blocks()}  # the files as they are now
    assert (block.source, block.line) in current and current[(block.source, block.line)].code == block.code

    if command is not None:  # the blocks whose lines need different treatment
        world = request.getfixturevalue("world")
        if command.startswith("make test"):
            pytest.skip("`make test` is CI itself: this test suite (see .ci/run)")
        if command.startswith("make quickstart"):
            return make_quickstart(command, world, tmp_path)
        if "--pretrained laion2b_s34b_b79k" in command:
            return quickstart_from_hub(world)
        if CHECKPOINT_PLACEHOLDER in command:
            return quickstart_checkpoint(command, world)
        if command.startswith(".venv/bin/headmaster quickstart"):
            code = command.split("#")[0]
            return check_quickstart(ran(world.bash(code), code), world.root / "build" / "quickstart")
        pytest.fail(f"no check for this line of the block on {block.source} line {block.line}: {command}")

    if block.heading == "Command line":
        return check_synopsis(block)
    if "label-studio start" in block.code:
        return check_label_studio_block(block)
    if "─►" in block.code:
        return check_diagram(block, request.getfixturevalue("world"))
    if block.lang not in ("bash", "sh", "shell", "python"):
        pytest.fail(f"{block.source} line {block.line}: a ```{block.lang} block nobody checks; add a check here")

    world = request.getfixturevalue("served")
    code = world.substitute(block.code)
    if block.lang != "python" and not world.default_ports and re.search(r"headmaster classify (?!.*--url)", code):
        pytest.skip(
            f"the default ports {DEFAULT_PORTS} are taken here and this block relies on classify's "
            "default --url localhost:8001"
        )
    before = {
        name: list(head_state(world, name)[0].versions)
        for name in ("animal", "has_cat")
        if (world.repo / name).is_dir()
    }
    if block.lang == "python":
        output = ran(world.python(code), code)
    else:
        output = ran(world.bash(code), code)

    if "_cache_hits_total" in code:  # the caches of a repeated image (docs/serving.md)
        check_cache_hits(output)
    elif "curl " in code:
        check_curl(output, world)
    elif "shared_memory=" in code:
        check_shared_memory(output, block)
    elif "HeadmasterClient" in code:
        check_client(output, block, world)
    elif "--store store/" in code:
        check_store(output, block, world, before.get("animal", []))
    elif "zero-shot has_cat" in code:
        check_zero_shot_story(output, world)
    elif "train-head photos/animal" in code:
        check_training(output, block, world, before.get("animal", []))
    elif "perf_analyzer -m classify" in code:
        check_perf_analyzer(output, block)
    # any other bash or python block: exit 0 is the check
    return None


def test_readme_server_stops_cleanly(request):
    """The server the examples used stops on SIGTERM with exit code 0."""
    world: World = request.getfixturevalue("world")
    if world.serve is None:
        pytest.skip("no example started the server")
    assert world.serve.poll() is None, f"serve died during the examples:\n{world.serve_log.read_text()}"
    world.serve.send_signal(signal.SIGTERM)
    code = world.serve.wait(60)
    assert code == 0, f"serve exited {code}:\n{world.serve_log.read_text()}"
