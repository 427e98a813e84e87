"""Triton python-backend model: text (BYTES [1]) -> the encoder's token ids (INT64 [context]).

Uses open_clip's own tokenizer for the encoder's model name, so served text embeddings
match ``open_clip.get_tokenizer(name)`` exactly. Needs open_clip in the server's Python
(the bundled server uses Headmaster's environment; the container image installs it).

An ``hf:FOLDER`` encoder serves the folder's own tokenizer instead: its ``tokenizer.json``,
copied into ``tokenizer/`` beside this file when the repository is built, run by the
``tokenizers`` library (what transformers' fast tokenizers run), truncated and padded to the
context length with the folder's pad id, as ``tokenizer(..., padding="max_length",
truncation=True)`` does. This file imports nothing else of Headmaster: Triton loads it alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TOKENIZER_DIR = "tokenizer"  # beside model.py in the version folder, and in an hf:FOLDER export


def folder_tokenizer(folder, context_length: int, pad_id: int):
    """texts -> INT64 [N, context_length] with a saved Hugging Face tokenizer (``folder/tokenizer.json``)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    # The file may carry its own padding (e.g. to the longest): the served tensor is fixed-size.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=context_length)  # keeps the special tokens, as transformers does
    tokenizer.enable_padding(length=context_length, pad_id=pad_id)

    def tokens(texts: list[str]) -> np.ndarray:
        return np.asarray([e.ids for e in tokenizer.encode_batch(list(texts))], dtype=np.int64).reshape(
            len(texts), context_length)

    return tokens


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.context_length = int(params["context_length"])
        if params.get("tokenizer") == "folder":
            version = Path(args["model_repository"]) / args["model_version"]  # this model's version folder
            self._encode = folder_tokenizer(version / TOKENIZER_DIR, self.context_length,
                                            int(params["pad_id"]))
        else:
            import open_clip

            tokenizer = open_clip.get_tokenizer(params["model"])
            self._encode = lambda texts: tokenizer(texts, context_length=self.context_length).numpy().astype(np.int64)

    def _tokens(self, request) -> np.ndarray:
        raw = self.pb.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
        texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in raw]
        return self._encode(texts)

    def execute(self, requests):
        pb = self.pb
        responses = []
        for request in requests:
            try:
                responses.append(pb.InferenceResponse([pb.Tensor("TOKENS", self._tokens(request))]))
            except UnicodeDecodeError as e:
                responses.append(pb.InferenceResponse(
                    error=pb.TritonError(f"TEXT is not valid UTF-8: {e}", pb.TritonError.INVALID_ARG)))
        return responses
