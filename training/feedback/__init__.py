"""The feedback loop on the store: rescore, corrections, dataset snapshots, suggestions, re-embedding."""
