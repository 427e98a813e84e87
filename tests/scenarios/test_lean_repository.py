"""`repo build --no-serve-text`: the text tower and tokenizer stay in the repository, zero-shot
heads are still made from them, and the server is asked to load neither."""

from __future__ import annotations

from headmaster.model_repository import consistency
from headmaster.model_repository.repository import Repository
from tests.helpers import ZERO_SHOT, build_repo


def test_a_lean_repository_makes_zero_shot_heads_but_serves_no_text_model(encoder_dir, tmp_path):
    repo = build_repo(
        encoder_dir, tmp_path / "model_repository", heads={"animal": ZERO_SHOT["animal"]}, serve_text=False
    )
    repository = Repository(repo)
    assert repository.head("animal").live == 1  # made from the text tower on disk
    assert (repo / "text_encoder" / "1").is_dir()
    names = repository.model_names()
    assert not {"tokenize", "text_encoder", "embed_text"} & set(names), names
    assert {"preprocess", "image_encoder", "animal", "classify", "embed"} <= set(names)
    consistency.check(repo)  # a servable state
