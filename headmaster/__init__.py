"""Headmaster: classify content with foundation-model embeddings and tiny heads on NVIDIA Triton.

The package is assembled from the checkout's top-level folders (see docs/architecture.md, "Where things
live"): ``headmaster.errors`` (this folder) is the one exception family every other part
raises from; ``headmaster.export``, ``headmaster.repository``, ``headmaster.server``,
``headmaster.lifecycle``, ``headmaster.served``, ``headmaster.rules``, ``headmaster.training``,
``headmaster.store``, ``headmaster.pipelines``, ``headmaster.client`` and ``headmaster.cli`` are the jobs.
"""

__version__ = "0.1.0"
