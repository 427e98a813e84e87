"""Which Triton models a repository serves and how they connect: pure functions of the encoder
card, the build options and the set of heads (no files are read), so they are unit-tested alone.

    classify            IMAGE -> preprocess -> image_encoder -> every head -> threshold -> RESULT
                        (a text encoder, st:FOLDER: TEXT -> tokenize -> text_encoder -> ... -> RESULT)
    classify_embedding  EMBEDDING -> every head -> threshold -> RESULT (no encoder: stored embeddings)
    embed, embed_text   IMAGE / TEXT -> the encoder alone -> EMBEDDING

Every ensemble output is a copy made by the last step (``threshold``), never a tensor another
step reads: Triton's ensemble scheduler prunes the producer of an output a request leaves out
(see config.ThresholdModel).
"""

from __future__ import annotations

from headmaster.repository.config import (
    EncoderModel,
    EnsembleModel,
    HeadModel,
    Instances,
    PreprocessModel,
    Step,
    Tensor,
    ThresholdModel,
    TokenizeModel,
)

# Models whose configs name every head, in the order they load after a head arrives.
HEAD_DEPENDENT = ("threshold", "classify", "classify_embedding")


def text_only(card) -> bool:
    """A text encoder (st:FOLDER): no image tower, so ``classify`` reads TEXT (UTF-8 bytes)."""
    return "image" not in card.towers


def serves_text(card, options) -> bool:
    """The text tower is loaded: a text encoder's always; an image encoder's only when built with
    ``--serve-text`` (otherwise it stays on disk for zero-shot heads, unloaded: less memory)."""
    return "text" in card.towers and (options.serve_text or text_only(card))


def encoder_model(card, options, tower: str) -> EncoderModel:
    """``card``: the EncoderCard; ``options``: the repository's BuildOptions."""
    spec = card.towers[tower]
    return EncoderModel(
        name=f"{tower}_encoder",
        format=spec.format,
        input=Tensor(spec.input_name, spec.input_dtype, tuple(spec.input_dims)),
        output=Tensor(spec.output_name, "FP32", (card.embed_dim,)),
        batching=options.encoder_batching,
        instances=Instances(options.encoder_instances, gpu=True),
        graph_optimization=spec.graph_optimization,
        device=options.device,
        fingerprint=card.fingerprint,
        # Images repeat, texts are few and cheap: only the image tower keeps a cache.
        cache_bytes=int(options.embedding_cache_mb * 2**20) if tower == "image" else 0,
    )


def head_model(card, options, name: str, live: int, labels: int) -> HeadModel:
    """A head serving version ``live``, whose SCORES has ``labels`` columns."""
    return HeadModel(name, card.embed_dim, live, labels, options.light_batching)


def embed_ensembles(card, options) -> list[EnsembleModel]:
    d = card.embed_dim
    ensembles = []
    if not text_only(card):
        image = encoder_model(card, options, "image")
        ensembles.append(
            EnsembleModel(
                "embed",
                (Tensor("IMAGE", "BYTES", (1,)),),
                (Tensor("EMBEDDING", "FP32", (d,)),),
                (
                    Step("preprocess", {"IMAGE": "IMAGE"}, {"PIXELS": "PIXELS"}),
                    Step(image.name, {image.input.name: "PIXELS"}, {image.output.name: "EMBEDDING"}),
                ),
                options.max_batch_size,
            )
        )
    if serves_text(card, options):
        text = encoder_model(card, options, "text")
        ensembles.append(
            EnsembleModel(
                "embed_text",
                (Tensor("TEXT", "BYTES", (1,)),),
                (Tensor("EMBEDDING", "FP32", (d,)),),
                (
                    Step("tokenize", {"TEXT": "TEXT"}, {"TOKENS": "TOKENS"}),
                    Step(text.name, {text.input.name: "TOKENS"}, {text.output.name: "EMBEDDING"}),
                ),
                options.max_batch_size,
            )
        )
    return ensembles


def static_models(card, options) -> list:
    """Everything but the heads and what depends on the set of heads."""
    o = options
    decode_on_gpu = o.decoder == "torchvision" and o.device == "cuda"
    models: list = (
        []
        if text_only(card)
        else [
            PreprocessModel(
                card.preprocessing,
                o.light_batching,
                Instances(o.preprocess_instances, decode_on_gpu),
                o.preprocess_threads,
                max_pixels=o.max_pixels,
                max_aspect_ratio=o.max_aspect_ratio,
                max_request_bytes=o.max_request_bytes,
                exact_decode=o.exact_decode,
                decoder=o.decoder,
                cache_bytes=int(o.decoded_cache_mb * 2**20),
            ),
            encoder_model(card, options, "image"),
        ]
    )
    if serves_text(card, options):
        models += [
            TokenizeModel(
                card.model,
                card.context_length,
                o.light_batching,
                folder_tokenizer=card.tokenizer,
                max_text_bytes=o.max_text_bytes,
                refuse_empty=text_only(card),
            ),
            encoder_model(card, options, "text"),
        ]
    return models + embed_ensembles(card, options)


def head_dependent_models(
    card, options, heads: list[str], pinned: dict[str, int] | None = None, ab: dict[str, dict] | None = None
) -> list:
    """threshold, ``classify`` (from image bytes) and ``classify_embedding`` (from an embedding
    computed earlier, e.g. one kept in a store: the heads run, the encoder does not).

    ``pinned``: head -> the version its step runs, for a head whose config loads two versions
    (Triton's ``-1`` would pick the newer one, the candidate, not the live one). ``ab``: head ->
    {"version", "share", "mode"} of its A/B or shadow test: the candidate runs as a second step
    of the same model, its outputs handed to threshold (see served/threshold.py)."""
    pinned, ab = pinned or {}, ab or {}
    d = card.embed_dim
    result = Tensor("RESULT", "BYTES", (1,))
    head_outputs = tuple(Tensor(f"SCORES_{head}", "FP32", (-1,)) for head in heads)

    def head_steps(embedding: str, with_embedding: bool) -> tuple[Step, ...]:
        steps, inputs, outputs = [], {"EMBEDDING": embedding}, {"RESULT": "RESULT"}
        for head in heads:
            steps.append(
                Step(
                    head,
                    {"EMBEDDING": embedding},
                    {"SCORES": f"HEAD_SCORES_{head}", "INFO": f"HEAD_INFO_{head}"},
                    pinned.get(head, -1),
                )
            )
            inputs.update({f"SCORES_{head}": f"HEAD_SCORES_{head}", f"INFO_{head}": f"HEAD_INFO_{head}"})
            outputs[f"SCORES_OUT_{head}"] = f"SCORES_{head}"
            if head in ab:
                steps.append(
                    Step(
                        head,
                        {"EMBEDDING": embedding},
                        {"SCORES": f"AB_SCORES_{head}", "INFO": f"AB_INFO_{head}"},
                        int(ab[head]["version"]),
                    )
                )
                inputs.update({f"SCORES_AB_{head}": f"AB_SCORES_{head}", f"INFO_AB_{head}": f"AB_INFO_{head}"})
        if with_embedding:
            outputs["EMBEDDING_OUT"] = "EMBEDDING"
        return (*steps, Step("threshold", inputs, outputs))

    def keyed(steps: tuple[Step, ...], key: dict[str, str]) -> tuple[Step, ...]:
        # threshold, the last step, also reads each item's A/B key (the image, or its sha256).
        last = steps[-1]
        return (*steps[:-1], Step(last.model, {**last.inputs, **key}, last.outputs))

    if text_only(card):  # TEXT: its A/B key is the text's bytes, hashed as an image's are
        text = encoder_model(card, options, "text")
        item = "TEXT"
        embed_steps = (
            Step("tokenize", {"TEXT": "TEXT"}, {"TOKENS": "TOKENS"}),
            Step(text.name, {text.input.name: "TOKENS"}, {text.output.name: "IMAGE_EMBEDDING"}),
        )
    else:
        image = encoder_model(card, options, "image")
        item = "IMAGE"
        embed_steps = (
            Step("preprocess", {"IMAGE": "IMAGE"}, {"PIXELS": "PIXELS"}),
            Step(image.name, {image.input.name: "PIXELS"}, {image.output.name: "IMAGE_EMBEDDING"}),
        )
    ab_params = {head: {k: test[k] for k in ("version", "share", "mode")} for head, test in ab.items()}
    return [
        ThresholdModel(tuple(heads), d, options.light_batching, encoder=card.fingerprint, ab=ab_params or None),
        EnsembleModel(
            "classify",
            (Tensor(item, "BYTES", (1,)),),
            (Tensor("EMBEDDING", "FP32", (d,)), result, *head_outputs),
            keyed(embed_steps + head_steps("IMAGE_EMBEDDING", True), {"IMAGE": item} if ab else {}),
            options.max_batch_size,
        ),
        EnsembleModel(
            "classify_embedding",
            (Tensor("EMBEDDING", "FP32", (d,)), Tensor("SHA256", "BYTES", (1,), optional=True)),
            (result, *head_outputs),
            keyed(head_steps("EMBEDDING", False), {"SHA256": "SHA256"}),
            options.max_batch_size,
        ),
    ]


def model_names(card, options, heads: list[str]) -> list[str]:
    """What the server loads, dependencies first."""
    return (
        [m.name for m in static_models(card, options) if not isinstance(m, EnsembleModel)]
        + list(heads)
        + [m.name for m in head_dependent_models(card, options, heads)]
        + [m.name for m in embed_ensembles(card, options)]
    )
