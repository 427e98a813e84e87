"""Reading the live metrics of a real server from its metrics port.

The exposition is read line by line rather than through prometheus-client's parser: that
parser renames counter samples (``x_bucket`` becomes ``x_bucket_total``), and what must be
checked is the exact series Prometheus stores and the alert rules and dashboard query.
"""

from __future__ import annotations

import re
import urllib.request

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)")


# The cache series (served/cache.py: the image encoder's embeddings, preprocess's decoded pixels)
# count images a model skipped, not what heads answered: left out of a scrape unless its prefix
# names them.
CACHE_PREFIXES = ("headmaster_embedding_cache", "headmaster_decoded_cache")


def scrape(metrics_url: str, prefix: str = "headmaster_") -> dict[tuple[str, tuple], float]:
    """(series name, sorted label pairs) -> value of every series whose name starts with prefix
    (a cache's only when the prefix is theirs)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out = {}
    skipped = tuple(p for p in CACHE_PREFIXES if not prefix.startswith(p))
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match["name"].startswith(prefix) and not (skipped and match["name"].startswith(skipped)):
            labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or "")))
            out[match["name"], labels] = float(match["value"])
    return out


def increase(before: dict, after: dict) -> dict:
    """What each series rose by between two scrapes; series that did not move are left out."""
    return {key: value - before.get(key, 0.0) for key, value in after.items() if value != before.get(key, 0.0)}
