"""The order in which :mod:`live` asks a server to load and unload, against a recording control API.

The real-Triton tests (test_hot_swap.py, test_s3_replicas.py, test_serve_operations.py) show that
the order keeps every request answered; these pin the order itself, in milliseconds.
"""

from __future__ import annotations

import json

import pytest

from headmaster.errors import ServerError
from headmaster.server import live
from headmaster.server.record import KEY_ENV
from tests.control_recorder import ControlRecorder

pytestmark = pytest.mark.pure  # a loopback HTTP server in this process; no Triton, nothing shared on disk

HEAD = "animal"
ROUTES = {  # the ensembles while they still name the head, and threshold with its input
    "classify": {"name": "classify", "ensemble_scheduling": {"step": [{"model_name": HEAD}]}},
    "classify_embedding": {"name": "classify_embedding", "ensemble_scheduling": {"step": [{"model_name": HEAD}]}},
    "threshold": {"name": "threshold", "input": [{"name": HEAD}]},
}
WITHOUT = {name: {"name": name, "ensemble_scheduling": {"step": []}} for name in ("classify", "classify_embedding")}
REMOVED_IN_ORDER = [
    ("load", "classify_embedding"),
    ("load", "classify"),
    ("config", "classify_embedding"),
    ("config", "classify"),
    ("load", "threshold"),
    ("unload", HEAD),
]


def serving_head(**kwargs) -> ControlRecorder:
    """A recorder whose server holds the head and the ensembles that route through it, and whose
    disk no longer names the head (what a removal leaves)."""
    api = ControlRecorder(disk=dict(WITHOUT), **kwargs)
    api.held.update({HEAD: {"name": HEAD}, **json.loads(json.dumps(ROUTES))})
    return api


def test_a_published_head_loads_before_threshold_and_threshold_before_the_ensembles():
    with ControlRecorder() as api:
        live.head_published(live.Control(api.http_url, "k"), HEAD)
    assert api.order() == [("load", HEAD), ("load", "threshold"), ("load", "classify"), ("load", "classify_embedding")]


def test_a_removed_head_leaves_the_ensembles_first_then_threshold_then_unloads():
    with serving_head() as api:
        live.head_removed(live.Control(api.http_url, "k"), HEAD)
    assert api.order() == REMOVED_IN_ORDER
    assert HEAD not in api.held


def test_a_removal_can_leave_threshold_for_later():
    with serving_head() as api:
        live.head_removed(live.Control(api.http_url, "k"), HEAD, reload_threshold=False)
    assert api.order() == [c for c in REMOVED_IN_ORDER if c != ("load", "threshold")]


def test_an_ensemble_that_still_names_the_head_is_loaded_again_before_threshold_changes(monkeypatch):
    slept = []
    monkeypatch.setattr(live.time, "sleep", slept.append)
    with serving_head(stale_loads={"classify": 1}) as api:  # its first load kept the old config
        live.head_removed(live.Control(api.http_url, "k"), HEAD)
    assert api.order() == [
        ("load", "classify_embedding"),
        ("load", "classify"),
        ("config", "classify_embedding"),
        ("config", "classify"),
        ("load", "classify"),
        ("config", "classify"),
        ("load", "threshold"),
        ("unload", HEAD),
    ]
    assert slept == [1.0]


def test_an_ensemble_that_keeps_naming_the_head_stops_the_removal_before_threshold(monkeypatch):
    monkeypatch.setattr(live.time, "sleep", lambda s: None)
    with (
        serving_head(stale_loads={"classify": 4}) as api,
        pytest.raises(ServerError, match=r"kept serving classify with head 'animal' after three loads"),
    ):
        live.head_removed(live.Control(api.http_url, "k"), HEAD)
    assert api.order("load").count(("load", "classify")) == 4
    assert ("load", "threshold") not in api.order() and ("unload", HEAD) not in api.order()


def test_every_call_carries_the_key():
    with serving_head() as api:
        live.head_published(live.Control(api.http_url, "s3cret"), HEAD)
        live.head_removed(live.Control(api.http_url, "s3cret"), HEAD)
        live.states(live.Control(api.http_url, "s3cret"))
    assert len(api.calls) == 4 + len(REMOVED_IN_ORDER) + 1
    assert {call.key for call in api.calls} == {"s3cret"}


def test_a_bare_address_takes_its_key_from_the_environment(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "from-env")
    with ControlRecorder() as api:
        live.load(api.http_url, ["threshold"])
    assert [(c.action, c.model, c.key) for c in api.calls] == [("load", "threshold", "from-env")]


def test_without_the_key_the_error_says_the_control_api_is_closed(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with (
        ControlRecorder(refuse={("load", HEAD): 403}) as api,
        pytest.raises(ServerError, match=r"refused to load 'animal': its control API is closed") as caught,
    ):
        live.head_published(api.http_url, HEAD)
    assert KEY_ENV in str(caught.value)
    assert api.order() == [("load", HEAD)]  # nothing after the refusal
    assert api.calls[0].key is None


def test_a_model_the_server_cannot_load_is_named_and_nothing_after_it_is_asked():
    with (
        ControlRecorder(refuse={("load", "threshold"): 400}) as api,
        pytest.raises(ServerError, match=r"could not load model 'threshold': failed to load 'threshold'"),
    ):
        live.head_published(live.Control(api.http_url, "k"), HEAD)
    assert api.order() == [("load", HEAD), ("load", "threshold")]


def test_an_s3_server_gets_the_validated_config_with_each_load(tmp_path):
    (tmp_path / HEAD).mkdir()
    (tmp_path / HEAD / "config.pbtxt").write_text(f'name: "{HEAD}"\nbackend: "python"\nmax_batch_size: 8\n')
    with ControlRecorder() as api:
        live.load(live.Control(api.http_url, "k", configs=tmp_path), [HEAD, "threshold"])
    sent = {call.model: call.body for call in api.calls}
    config = json.loads(sent[HEAD]["parameters"]["config"])
    assert config == {"name": HEAD, "backend": "python", "max_batch_size": 8}
    assert "config" not in sent["threshold"].get("parameters", {})  # no file in the copy: nothing sent


def test_each_replica_gets_the_same_order():
    with ControlRecorder() as a, ControlRecorder() as b, serving_head() as c, serving_head() as d:
        live.head_published(live.Replicas((live.Control(a.http_url, "k"), live.Control(b.http_url, "k"))), HEAD)
        live.head_removed(live.Replicas((live.Control(c.http_url, "k"), live.Control(d.http_url, "k"))), HEAD)
    assert (
        a.order()
        == b.order()
        == [("load", HEAD), ("load", "threshold"), *[("load", m) for m in ROUTES if m != "threshold"]]
    )
    assert c.order() == d.order() == REMOVED_IN_ORDER


def test_a_replica_that_refuses_is_named_with_those_that_did_change():
    with ControlRecorder() as a, ControlRecorder(refuse={("load", "threshold"): 400}) as b:
        replicas = live.Replicas((live.Control(a.http_url, "k"), live.Control(b.http_url, "k")))
        with pytest.raises(ServerError) as caught:
            live.head_published(replicas, HEAD)
    message = str(caught.value)
    assert message.startswith(f"the server at {b.http_url} could not load model 'threshold'")
    assert message.endswith(f"(replicas that did change: {a.http_url})")
    assert a.order() == [("load", HEAD), ("load", "threshold"), ("load", "classify"), ("load", "classify_embedding")]
    assert b.order() == [("load", HEAD), ("load", "threshold")]  # the refusing replica went no further


def test_a_rollout_reports_a_straggler_and_still_updates_the_others():
    with ControlRecorder(refuse={("load", HEAD): 403}) as a, ControlRecorder() as b:
        report = live.rollout(live.Replicas((live.Control(a.http_url), live.Control(b.http_url, "k"))), [HEAD])
    assert report[b.http_url] is None and "control API is closed" in report[a.http_url]
    assert b.order() == [("load", HEAD), ("load", "threshold"), ("load", "classify"), ("load", "classify_embedding")]
