"""Pipelines that outgrow one process: a backfill on Ray Data (:mod:`.backfill`) and the
embed -> queue -> heads split (:mod:`.workers` over the broker of :mod:`.queue`)."""
