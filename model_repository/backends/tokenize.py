"""Triton python-backend model: text (BYTES [1]) -> the encoder's token ids (INT64 [context]).

Uses open_clip's own tokenizer for the encoder's model name, so served text embeddings
match ``open_clip.get_tokenizer(name)`` exactly. Needs open_clip in the server's Python
(the bundled server uses Headmaster's environment; the container image installs it).
"""

from __future__ import annotations

import json

import numpy as np


class TritonPythonModel:
    def initialize(self, args):
        import open_clip
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.tokenizer = open_clip.get_tokenizer(params["model"])
        self.context_length = int(params["context_length"])

    def _tokens(self, request) -> np.ndarray:
        raw = self.pb.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
        texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in raw]
        return self.tokenizer(texts, context_length=self.context_length).numpy().astype(np.int64)

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
