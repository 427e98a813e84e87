"""A/B (canary) and shadow tests of head versions on a real server, under load.

One dedicated server on a copy of the session repository. The head ``animal`` gets a second
version (random weights, the same labels) that is taken back off the live seat, then tested:
as a canary answering 10% of the items, and in shadow. 5,000 stored items (embeddings with the
sha256 of their images) go through ``classify_embedding`` while client threads classify real
photos end to end; the test is promoted or aborted in the middle of that load. What must hold:
no request fails; each item's arm follows the sha256 rule (checked with its own arithmetic
here), and the candidate's share is within 2 points of the asked one; every answer is the
answering version's own scores and thresholds; a shadow never changes an answer; the
Prometheus counters on the metrics port add up to the answers; `heads compare` reads the store.
"""

from __future__ import annotations

import hashlib
import re
import threading
import urllib.request

import numpy as np
import pytest

from headmaster.client import HeadmasterClient
from headmaster.errors import RepositoryError
from headmaster.export.heads import HeadCard, HeadWeights
from headmaster.lifecycle import operations as lifecycle
from headmaster.repository import ab
from headmaster.rules.threshold import accept
from headmaster.server import live
from headmaster.store import open_store
from tests.helpers import ARTIFACTS, Clients, clone_repo, run_cli, start_server, written_version

HEAD = "animal"
ITEMS = 5000
SHARE = 0.1


@pytest.fixture(scope="module")
def ab_server(repo, tmp_path_factory):
    copy = clone_repo(repo, tmp_path_factory.mktemp("ab") / "repo")
    server = start_server(copy, ARTIFACTS / "ab")
    yield server, copy
    server.stop()


def candidate_of(server, repo, seed: int) -> tuple[int, int]:
    """A new version of HEAD with the live version's labels, published and then rolled back:
    on disk, not live. Returns (live, candidate)."""
    before = lifecycle._live_version(repo, HEAD)
    labels = HeadCard.load(repo / HEAD / str(before)).labels
    card = written_version(repo, HEAD, np.random.default_rng(seed), tuple(labels))
    lifecycle.rollback(repo, HEAD, before)
    assert live.loaded(server)[HEAD] == str(before)
    return before, card.version


def stored_items(seed: int) -> tuple[list[str], np.ndarray]:
    """ITEMS items as a store keeps them: the sha256 of their image bytes and an embedding."""
    rng = np.random.default_rng(seed)
    hashes = [hashlib.sha256(rng.bytes(64)).hexdigest() for _ in range(ITEMS)]
    vectors = rng.normal(size=(ITEMS, 384)).astype(np.float32)
    return hashes, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def in_share(sha256: str, share: float) -> bool:
    return int(sha256[:16], 16) / 2.0**64 < share  # the rule as the README states it


def version_of(repo, version: int) -> tuple[HeadWeights, dict]:
    folder = repo / HEAD / str(version)
    return HeadWeights.from_onnx(folder / "model.onnx"), HeadCard.load(folder).info()


def assert_answers_are_the_versions_own(repo, results, embeddings) -> None:
    """Each answer (and the other arm's) is what its version computes, with its own thresholds."""
    cache = {}
    for result, embedding in zip(results, embeddings):
        answer = result.heads[HEAD]
        for version, labels, scores in (
            (answer.version, answer.labels, answer.scores),
            (answer.ab["other"]["version"], answer.ab["other"]["labels"], answer.ab["other"]["scores"]),
        ):
            weights, info = cache.setdefault(version, version_of(repo, version))
            expected = weights.scores(np.asarray(embedding, np.float32)[None, :])[0]
            np.testing.assert_allclose([scores[label] for label in info["labels"]], expected, atol=1e-4)
            assert list(labels) == accept(expected[None, :], info)[0]


def ab_counters(server) -> dict[tuple[str, str, str], float]:
    """(mode, arm, agree) -> items, from the server's Prometheus endpoint."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    counts: dict = {}
    for line in text.splitlines():
        if line.startswith("headmaster_ab_items_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            key = (labels["mode"], labels["arm"], labels["agree"])
            counts[key] = counts.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def classify_items(
    server, hashes, vectors, results: list, stop_after: int | None = None, event: threading.Event | None = None
) -> None:
    with HeadmasterClient(server.grpc_url, batch_size=64, max_in_flight=2, timeout_s=60) as client:
        for start in range(0, len(hashes), 250):
            if event is not None and start >= (stop_after or 0):
                event.set()
            results += client.classify_embeddings(
                vectors[start : start + 250], hashes[start : start + 250], hashes[start : start + 250]
            )


def test_canary_share_stable_arms_counters_and_promote_under_load(ab_server, jpeg_photos, tmp_path):
    server, repo = ab_server
    base, candidate = candidate_of(server, repo, seed=1)
    test = lifecycle.start_test(repo, HEAD, candidate, share=SHARE)
    assert (test.mode, test.live, test.version) == ("canary", base, candidate)
    assert {(v, s) for _, v, s in live.states(server) if _ == HEAD} >= {(str(base), "READY"), (str(candidate), "READY")}
    hashes, vectors = stored_items(seed=2)
    images = list(jpeg_photos.values())[:3]
    before = ab_counters(server)

    results: list = []
    with Clients(server.grpc_url, images, n=2, settle_s=1.0) as load:
        classify_items(server, hashes, vectors, results)
        assert live.loaded(server)[HEAD] in (str(base), str(candidate))
    assert load.failures == []
    assert len(results) == ITEMS and all(r.ok for r in results)

    # The arms: the sha256 rule, a share within 2 points, the version that answered.
    expected_arm = ["candidate" if in_share(h, SHARE) else "live" for h in hashes]
    arms = [r.heads[HEAD].ab["arm"] for r in results]
    assert arms == expected_arm
    assert [r.heads[HEAD].version for r in results] == [candidate if a == "candidate" else base for a in arms]
    share = arms.count("candidate") / ITEMS
    assert abs(share - SHARE) <= 0.02, share
    assert_answers_are_the_versions_own(repo, results, vectors)

    # The same image always gets the same arm: end to end from its bytes, again and again.
    photo_arms = {}
    for _, _, answer in load.answers:
        photo_arms.setdefault(answer.sha256, set()).add(answer.heads[HEAD].ab["arm"])
    assert len(photo_arms) == len(images)
    for sha, seen in photo_arms.items():
        assert seen == {"candidate" if in_share(sha, SHARE) else "live"}
    # ... and by its bytes or by its stored embedding + sha256 alike.
    with HeadmasterClient(server.grpc_url) as client:
        stored = client.classify_embeddings(
            np.stack([a.embedding for _, _, a in load.answers[:3]]),
            [None] * 3,
            [a.sha256 for _, _, a in load.answers[:3]],
        )
    assert [s.heads[HEAD].ab["arm"] for s in stored] == [a.heads[HEAD].ab["arm"] for _, _, a in load.answers[:3]]

    # Prometheus: the counters grew by exactly the items answered, per arm and agreement.
    after = ab_counters(server)
    answered = list(results) + [a for _, _, a in load.answers] + stored
    for arm in ("live", "candidate"):
        for agree in (True, False):
            key = ("canary", arm, "true" if agree else "false")
            want = sum(1 for r in answered if r.heads[HEAD].ab["arm"] == arm and r.heads[HEAD].ab["agree"] == agree)
            assert after.get(key, 0) - before.get(key, 0) == want, (key, after, before)

    # The store keeps both versions' rows; the current labels are the answering version's.
    store = open_store(tmp_path / "store")
    store.add_embeddings(hashes, [f"item-{i}.jpg" for i in range(ITEMS)], "fp", vectors)
    store.add_classifications(results, "fp")
    current = store.labels(HEAD)
    assert dict(zip(current["sha256"].to_pylist(), current["version"].to_pylist())) == {
        r.sha256: r.heads[HEAD].version for r in results
    }
    assert store.labels(HEAD, base).num_rows == store.labels(HEAD, candidate).num_rows == ITEMS
    agree = sum(r.heads[HEAD].ab["agree"] for r in results)
    shown = run_cli("heads", "compare", HEAD, "--repo", str(repo), "--store", str(tmp_path / "store"), "--show", "3")
    assert shown.returncode == 0, shown.stderr
    assert f"v{base} and v{candidate} agree on {agree} of {ITEMS} items" in shown.stdout
    assert "changed images (first 3)" in shown.stdout and "item-" in shown.stdout

    # Promote while photos and stored items keep coming: nothing fails, the candidate takes over.
    results = []
    go = threading.Event()
    feeder = threading.Thread(target=classify_items, args=(server, hashes[:2000], vectors[:2000], results, 500, go))
    with Clients(server.grpc_url, images, n=2, settle_s=2.0) as load:
        feeder.start()
        go.wait(60)
        change = lifecycle.finish_test(repo, HEAD, promote=True)
        feeder.join(120)
        promoted_at = len(load.results)
    assert load.failures == [] and len(results) == 2000 and all(r.ok for r in results)
    assert change.version == candidate and ab.running(repo, HEAD) is None
    assert live.loaded(server)[HEAD] == str(candidate)
    assert [v for name, v, s in live.states(server) if name == HEAD and s == "READY"] == [str(candidate)]
    late = [a for _, _, a in load.answers[promoted_at:]]
    assert late and all(a.heads[HEAD].version == candidate and a.heads[HEAD].ab is None for a in late[-4:])
    for r in results:  # every answer is one version's own, whichever side of the switch it fell
        assert r.heads[HEAD].version in (base, candidate)


def test_shadow_never_changes_an_answer_and_abort_under_load(ab_server, jpeg_photos):
    server, repo = ab_server
    base, candidate = candidate_of(server, repo, seed=3)
    lifecycle.start_test(repo, HEAD, candidate, shadow=True)
    hashes, vectors = stored_items(seed=4)
    hashes, vectors = hashes[:2000], vectors[:2000]
    images = list(jpeg_photos.values())[:3]
    with HeadmasterClient(server.grpc_url) as client:
        plain = {a.sha256: a for a in client.classify(images)}  # what the live version answers alone...

    results: list = []
    go = threading.Event()
    feeder = threading.Thread(target=classify_items, args=(server, hashes, vectors, results, 1000, go))
    with Clients(server.grpc_url, images, n=2, settle_s=2.0) as load:
        feeder.start()
        go.wait(60)
        aborted = lifecycle.finish_test(repo, HEAD, promote=False)
        feeder.join(120)
    assert load.failures == [] and len(results) == 2000 and all(r.ok for r in results)
    assert aborted.version == base
    shadowed = [r for r in results if r.heads[HEAD].ab is not None]
    assert len(shadowed) >= 1000  # the first half ran while the shadow did
    assert all(r.heads[HEAD].version == base for r in results)
    assert all(
        r.heads[HEAD].ab["arm"] == "live" and r.heads[HEAD].ab["other"]["version"] == candidate for r in shadowed
    )
    assert_answers_are_the_versions_own(repo, shadowed, [v for r, v in zip(results, vectors) if r.heads[HEAD].ab])
    # ...is what every photo got, with or without the shadow.
    for _, _, answer in load.answers:
        head = answer.heads[HEAD]
        assert (head.version, head.labels) == (base, plain[answer.sha256].heads[HEAD].labels)
        assert head.scores == pytest.approx(plain[answer.sha256].heads[HEAD].scores, abs=1e-5)
    assert [v for name, v, s in live.states(server) if name == HEAD and s == "READY"] == [str(base)]
    assert ab_counters(server).get(("shadow", "candidate", "true"), 0) == 0  # a shadow never answers


def test_a_head_under_test_refuses_other_changes(ab_server, tmp_path):
    server, repo = ab_server
    base, candidate = candidate_of(server, repo, seed=5)
    other = written_version(repo, HEAD, np.random.default_rng(6), ("cat", "dog"))  # other labels
    lifecycle.rollback(repo, HEAD, base)
    with pytest.raises(RepositoryError, match=rf"v{other.version} has labels \['cat', 'dog'\].*same labels"):
        lifecycle.start_test(repo, HEAD, other.version)
    failed = run_cli("heads", "canary", HEAD, "--version", str(candidate), "--share", "1.5", "--repo", str(repo))
    assert failed.returncode == 1 and failed.stderr.startswith("error: --share must be above 0 and below 1")
    assert "Traceback" not in failed.stderr
    started = run_cli("heads", "canary", HEAD, "--version", str(candidate), "--share", "0.5", "--repo", str(repo))
    assert started.returncode == 0, started.stderr
    assert f"v{candidate} runs beside v{base} to 50.0% of items" in started.stderr
    for action in (
        lambda: lifecycle.rollback(repo, HEAD, candidate),
        lambda: lifecycle.remove(repo, HEAD),
        lambda: written_version(repo, HEAD, np.random.default_rng(7), ("cat", "dog", "bird")),
    ):
        with pytest.raises(RepositoryError, match=rf"runs a canary test of v{candidate}.*heads promote {HEAD}"):
            action()
    again = run_cli("heads", "canary", HEAD, "--version", str(candidate), "--repo", str(repo))
    assert again.returncode == 1 and "error: cannot start another test on head animal" in again.stderr
    assert lifecycle._live_version(repo, HEAD) == base  # the config names two versions; the live one is base
    ended = run_cli("heads", "abort", HEAD, "--repo", str(repo))
    assert ended.returncode == 0, ended.stderr
    assert [v for name, v, s in live.states(server) if name == HEAD and s == "READY"] == [str(base)]
    none = run_cli("heads", "promote", HEAD, "--repo", str(repo))
    assert none.returncode == 1 and "error: head animal runs no A/B or shadow test" in none.stderr


def test_train_head_candidate_is_published_not_live_then_tested(ab_server, digits_dir, embedding_cache, tmp_path):
    """The user's order: a head is live; `train-head --candidate` makes the next version without
    serving it; `heads canary --shadow` tests it; `heads promote` makes it live."""
    from tests.helpers import subset

    server, repo = ab_server
    data = subset(digits_dir, tmp_path / "digits", {"3": 15, "8": 15}, rename={"3": "three", "8": "eight"})
    common = [
        "--name",
        "digit",
        "--repo",
        repo,
        "--server",
        server.http_url,
        "--cache",
        embedding_cache,
        "--epochs",
        "20",
    ]
    first = run_cli("train-head", data, *common, "--candidate")
    assert (
        first.returncode == 1
        and "error: head digit has no live version to test a candidate against" in first.stderr
        and "Traceback" not in first.stderr
    )
    assert not (repo / "digit").exists()
    assert run_cli("train-head", data, *common).returncode == 0
    candidate = run_cli("train-head", data, *common, "--candidate", "--seed", "1")
    assert candidate.returncode == 0, candidate.stderr
    said = " ".join((candidate.stdout + candidate.stderr).split())  # rich wraps lines at the terminal's width
    assert "head digit v2" in said and "a candidate, not live: test it with `headmaster heads canary digit" in said
    assert lifecycle._live_version(repo, "digit") == 1 and (repo / "digit" / "2" / "model.onnx").is_file()
    assert [v for name, v, s in live.states(server) if name == "digit" and s == "READY"] == ["1"]
    with HeadmasterClient(server.grpc_url) as client:
        assert {r.heads["digit"].version for r in client.classify(sorted(data.rglob("*.png"))[:6])} == {1}
    assert run_cli("heads", "canary", "digit", "--version", "2", "--shadow", "--repo", repo).returncode == 0
    with HeadmasterClient(server.grpc_url) as client:
        answers = client.classify(sorted(data.rglob("*.png"))[:6])
    assert {r.heads["digit"].version for r in answers} == {1}  # shadow: the live version answers
    assert {r.heads["digit"].ab["other"]["version"] for r in answers} == {2}
    assert run_cli("heads", "promote", "digit", "--repo", repo).returncode == 0
    assert lifecycle._live_version(repo, "digit") == 2
