"""The live metrics' arithmetic (threshold.metric_counts), by hand on three items."""

from __future__ import annotations

from headmaster.served.threshold import metric_counts


def test_one_request_sums_items_labels_abstentions_ood_and_cumulative_buckets():
    results = [
        {"version": 2, "labels": ["cat"], "scores": {"cat": 0.97, "dog": 0.03}, "ood": False},
        {"version": 2, "labels": [], "scores": {"cat": 0.45, "dog": 0.55}, "ood": True},
        {"version": 3, "labels": ["dog"], "scores": {"cat": 0.2, "dog": 0.8}},  # the other A/B arm
    ]
    v2, v3 = (("head", "animal"), ("version", "2")), (("head", "animal"), ("version", "3"))
    assert metric_counts("animal", "labels", results) == {
        ("headmaster_items_total", v2): 2,
        ("headmaster_items_total", v3): 1,
        ("headmaster_answers_total", (*v2, ("label", "cat"))): 1,
        ("headmaster_answers_total", (*v3, ("label", "dog"))): 1,
        ("headmaster_abstentions_total", v2): 1,
        ("headmaster_ood_total", v2): 1,
        # v2's top scores 0.97 and 0.55: one item at or under 0.6 ... 0.95, both at 0.99 and +Inf.
        **{("headmaster_top_score_bucket", (*v2, ("le", le))): 1 for le in ("0.6", "0.7", "0.8", "0.9", "0.95")},
        ("headmaster_top_score_bucket", (*v2, ("le", "0.99"))): 2,
        ("headmaster_top_score_bucket", (*v2, ("le", "+Inf"))): 2,
        # v3's 0.8: le=0.8 counts it (a bucket is "at most le").
        **{("headmaster_top_score_bucket", (*v3, ("le", le))): 1 for le in ("0.8", "0.9", "0.95", "0.99", "+Inf")},
    }


def test_a_regression_head_counts_items_and_ood_only():
    results = [{"version": 1, "labels": [], "scores": {"value": 3.2}, "value": 3.2, "ood": True}]
    base = (("head", "age"), ("version", "1"))
    assert metric_counts("age", "regression", results) == {
        ("headmaster_items_total", base): 1,
        ("headmaster_ood_total", base): 1,
    }
