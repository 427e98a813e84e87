"""Triton python-backend model: text (BYTES [1]) -> the encoder's token ids (INT64 [context]).

Uses open_clip's own tokenizer for the encoder's model name, so served text embeddings
match ``open_clip.get_tokenizer(name)`` exactly. Needs open_clip in the server's Python
(the bundled server uses Headmaster's environment; the container image installs it).

An ``hf:FOLDER`` encoder serves the folder's own tokenizer instead: its ``tokenizer.json``,
copied into ``tokenizer/`` beside this file when the repository is built, run by the
``tokenizers`` library (what transformers' fast tokenizers run), truncated and padded to the
context length with the folder's pad id, as ``tokenizer(..., padding="max_length",
truncation=True)`` does; a SigLIP folder's ``spiece.model`` is run by ``siglip_tokenizer`` (a port of
transformers' SiglipTokenizer, with sentencepiece). This file imports nothing else of Headmaster:
Triton loads it alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TOKENIZER_DIR = "tokenizer"  # beside model.py in the version folder, and in an hf:FOLDER export
MAX_TEXT_BYTES = 1 << 20  # UTF-8 bytes per text unless the config's max_text_bytes says otherwise


class InvalidText(ValueError):
    """A text the model refuses (the message names which item and why): a 400 for the client."""


def decode_texts(raw, max_bytes: int = MAX_TEXT_BYTES, allow_empty: bool = False) -> list[str]:
    """A request's TEXT items as strings, or InvalidText naming the first bad one: not UTF-8,
    empty (or only whitespace), or longer than ``max_bytes`` (refused before any tokenising)."""
    texts = []
    for i, item in enumerate(raw):
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        if len(data) > max_bytes:
            raise InvalidText(
                f"TEXT[{i}]: {len(data)} bytes is over the limit of {max_bytes} bytes per text (max_text_bytes)"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidText(
                f"TEXT[{i}]: not valid UTF-8 text (byte {e.start}: {e.reason}); send text encoded as UTF-8"
            ) from None
        if not allow_empty and not text.strip():
            raise InvalidText(
                f"TEXT[{i}]: empty text ({len(data)} bytes, nothing but whitespace): there is nothing to classify"
            )
        texts.append(text)
    return texts


def folder_tokenizer(folder, context_length: int, pad_id: int, spec: dict | None = None):
    """texts -> INT64 [N, context_length] with a saved Hugging Face tokenizer (``folder/tokenizer.json``),
    or a SigLIP folder's ``spiece.model`` when ``spec`` (the card's tokenizer record) says so."""
    if spec is not None and spec.get("format") == SIGLIP:
        return siglip_tokenizer(folder, context_length, pad_id, spec)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    # The file may carry its own padding (e.g. to the longest): the served tensor is fixed-size.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=context_length)  # keeps the special tokens, as transformers does
    tokenizer.enable_padding(length=context_length, pad_id=pad_id)

    def tokens(texts: list[str]) -> np.ndarray:
        return np.asarray([e.ids for e in tokenizer.encode_batch(list(texts))], dtype=np.int64).reshape(
            len(texts), context_length
        )

    return tokens


SIGLIP = "sentencepiece-siglip"  # the card's tokenizer "format" of a SigLIP folder's spiece.model
_UNDERLINE = "\u2581"  # sentencepiece's word boundary


def siglip_tokenizer(folder, context_length: int, pad_id: int, spec: dict):
    """texts -> INT64 [N, context_length] as transformers' ``SiglipTokenizer(texts, padding="max_length",
    truncation=True, max_length=context_length)`` gives them, with the folder's ``spiece.model``.

    A port of that class (transformers 5), because its text cleaning runs in Python and no
    ``tokenizer.json`` reproduces it: special tokens are split out first (whitespace beside them
    dropped); each other piece is lower-cased (``spec["lowercase"]``), stripped of ASCII punctuation
    and of repeated whitespace, and encoded behind the unk token, whose own pieces are then dropped
    (transformers' trick against sentencepiece's dummy prefix); ids are cut to leave room for the
    end-of-sequence id, which is appended unless already last, then padded with ``pad_id``.
    """
    import re
    import string

    import sentencepiece as spm

    model = spm.SentencePieceProcessor()
    model.Load(str(Path(folder) / "spiece.model"))
    unk, eos_id, lowercase = spec["unk_token"], int(spec["eos_id"]), bool(spec["lowercase"])
    special = {t: int(i) for t, i in spec["special_tokens"].items()}  # token -> id, split out before cleaning
    splitter = re.compile("(" + "|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)) + ")")
    unk_length = len(model.encode(unk))
    punctuation = str.maketrans("", "", string.punctuation)

    def pieces(text: str) -> list[str]:
        if lowercase:
            text = text.lower()
        text = re.sub(r"\s+", " ", text.translate(punctuation)).strip()
        out = model.encode(unk + text, out_type=str)
        return out[unk_length:] if len(out) >= unk_length else out

    def ids(text: str) -> list[int]:
        text = _UNDERLINE + text.replace(_UNDERLINE, " ")  # as SiglipTokenizer.tokenize does
        parts = splitter.split(text) if special else [text]
        for i, part in enumerate(parts):  # special tokens strip the whitespace beside them (lstrip, rstrip)
            if part in special:
                if i > 0:
                    parts[i - 1] = parts[i - 1].rstrip()
                if i + 1 < len(parts):
                    parts[i + 1] = parts[i + 1].lstrip()
        tokens = []
        for part in parts:
            if part:
                tokens.extend([part] if part in special else pieces(part))
        if len(tokens) > 1 and tokens[0] == _UNDERLINE and tokens[1] in special:
            tokens = tokens[1:]
        out = [special[t] if t in special else model.piece_to_id(t) for t in tokens][: context_length - 1]
        if not out or out[-1] != eos_id:
            out.append(eos_id)
        return out + [pad_id] * (context_length - len(out))

    def tokens(texts: list[str]) -> np.ndarray:
        return np.asarray([ids(t) for t in texts], dtype=np.int64).reshape(len(texts), context_length)

    return tokens


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.context_length = int(params["context_length"])
        self.max_bytes = int(params.get("max_text_bytes") or MAX_TEXT_BYTES)
        # Zero-shot prompts may be empty; a text encoder's repository (refuse_empty) classifies texts.
        self.allow_empty = params.get("refuse_empty") != "true"
        if params.get("tokenizer") == "folder":
            version = Path(args["model_repository"]) / args["model_version"]  # this model's version folder
            self._encode = folder_tokenizer(
                version / TOKENIZER_DIR,
                self.context_length,
                int(params["pad_id"]),
                json.loads(params.get("spec", "null")),
            )
        else:
            import open_clip

            tokenizer = open_clip.get_tokenizer(params["model"])
            self._encode = lambda texts: tokenizer(texts, context_length=self.context_length).numpy().astype(np.int64)

    def _tokens(self, request) -> np.ndarray:
        raw = self.pb.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
        return self._encode(decode_texts(raw, self.max_bytes, self.allow_empty))

    def execute(self, requests):
        pb = self.pb
        responses = []
        for request in requests:
            try:
                responses.append(pb.InferenceResponse([pb.Tensor("TOKENS", self._tokens(request))]))
            except InvalidText as e:
                responses.append(pb.InferenceResponse(error=pb.TritonError(str(e), pb.TritonError.INVALID_ARG)))
        return responses
