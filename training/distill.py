"""Distillation for the edge: a small timm network learns one head's (encoder + head) scores.

The teacher's scores come from the store: every stored item has the embedding the served
encoder made of its image, so the live head version applied to it *is* the teacher's answer,
on CPU, with no encoder run. The student sees the image itself (read from the item's stored
URI, its bytes checked against the item's sha256), preprocessed exactly as the served student
model will (``served/student.preprocess``), and is trained to match the teacher's
probabilities (soft cross-entropy for a single-label head, binary cross-entropy per label for a
multi-label one). It is exported to ONNX (checked against PyTorch), compared with the teacher
on held-out items, timed against the teacher on CPU (onnxruntime), and published into the
repository as its own model (``REPO/<name>/<N>/``: model.onnx, student.json, model.py) only if
it accepts the teacher's labels on at least ``min_agreement`` of the held-out items
(``MIN_AGREEMENT`` unless lowered): a student that disagrees is refused with its figures, and
nothing is written.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from headmaster.errors import DataError, RepositoryError, StoreError

LOG = logging.getLogger(__name__)
STUDENT_KEEP = 2  # student versions kept on disk
MIN_AGREEMENT = 0.9  # held-out items on which the student must accept the teacher's labels


@dataclass(frozen=True)
class DistillOptions:
    head: str  # the teacher: this head's live version, on the repository's encoder
    repo: Path
    store: str  # where the images (URIs, sha256) and their embeddings are
    student: str = "mobilenetv3_small_100"  # a timm model name
    name: str | None = None  # the served model's name (default: <head>_student)
    pretrained: bool = False  # timm's pretrained weights (needs them cached or a hub; none here)
    image_size: int | None = None  # default: the student's own input size (timm's data config)
    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-3
    val_fraction: float = 0.2  # held-out items the agreement is measured on
    seed: int = 0
    max_items: int | None = None
    min_agreement: float = MIN_AGREEMENT  # the floor of label_agreement below which nothing is published


@dataclass
class DistillReport:
    name: str
    version: int
    teacher: str  # "<head> v<N>"
    student: str  # the timm architecture
    parameters: int
    train_items: int
    val_items: int
    top1_agreement: float  # held-out items whose highest score is the teacher's highest
    label_agreement: float  # held-out items accepting the same labels under the teacher's thresholds
    mean_abs_score_diff: float  # held-out, over every label
    train_top1_agreement: float
    onnx_max_diff: float  # ONNX vs PyTorch on the held-out pixels
    student_img_s: float  # CPU, onnxruntime, from pixels, batch 16
    teacher_img_s: float  # the image encoder + the head, the same way
    seconds: float  # reading, training, export, comparison and timing (before publishing)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def data_config(student: str, image_size: int | None, num_classes: int, pretrained: bool):
    """The timm model and its preprocessing (the dict served/student.py reads)."""
    import timm
    from timm.data import resolve_data_config

    if student not in timm.list_models():
        known = ", ".join(timm.list_models("mobilenetv3*")[:6])
        raise DataError(f"--student {student!r} is not a timm model (e.g. {known})", option="student")
    try:
        model = timm.create_model(student, pretrained=pretrained, num_classes=num_classes)
    except Exception as e:  # no hub here: pretrained weights must be in the local cache
        raise DataError(
            f"cannot create {student} with pretrained weights: {type(e).__name__}: {e}; "
            "drop --pretrained, or fetch the weights on a machine with a hub",
            option="pretrained",
        ) from None
    config = resolve_data_config({}, model=model)
    size = int(image_size or config["input_size"][-1])
    return model, {
        "size": size,
        "crop_pct": float(config.get("crop_pct") or 0.875),
        "interpolation": str(config.get("interpolation") or "bilinear"),
        "mean": [float(x) for x in config["mean"]],
        "std": [float(x) for x in config["std"]],
    }


def stored_images(store, fingerprint: str, max_items: int | None) -> tuple[list[str], np.ndarray, list[bytes]]:
    """(sha256, embeddings, image bytes) of stored items made by ``fingerprint`` whose image can
    still be read with the same bytes."""
    import hashlib

    uris = store.uris()
    hashes, vectors, images = [], [], []
    skipped = 0
    for batch_hashes, batch in store.iter_embeddings(fingerprint, 4096):
        batch_hashes = batch_hashes.to_pylist() if hasattr(batch_hashes, "to_pylist") else list(batch_hashes)
        for sha, vector in zip(batch_hashes, batch):
            uri = uris.get(sha, {}).get(fingerprint)
            try:
                data = Path(uri).read_bytes() if uri else None
            except OSError:
                data = None
            if data is None or hashlib.sha256(data).hexdigest() != sha:
                skipped += 1
                continue
            hashes.append(sha)
            vectors.append(vector)
            images.append(data)
            if max_items and len(hashes) >= max_items:
                break
    if skipped:
        LOG.warning("%d stored items skipped: their image is gone or changed since it was stored", skipped)
    if len(hashes) < 8:
        raise StoreError(
            f"the store at {store.location} holds {len(hashes)} readable images embedded by the served "
            f"encoder ({skipped} unreadable or changed); distillation needs at least 8: classify images "
            "with --store first"
        )
    return hashes, np.stack(vectors).astype(np.float32), images


def _train(model, pixels: np.ndarray, targets: np.ndarray, options: DistillOptions, multi_label: bool) -> None:
    import torch

    torch.manual_seed(options.seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=1e-4)
    x, t = torch.from_numpy(pixels), torch.from_numpy(targets)
    model.train()
    for epoch in range(options.epochs):
        order = torch.randperm(len(x))
        total = 0.0
        for start in range(0, len(x), options.batch_size):
            index = order[start : start + options.batch_size]
            if len(index) < 2:  # BatchNorm needs two
                continue
            logits = model(x[index])
            if multi_label:
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, t[index])
            else:
                loss = -(t[index] * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss) * len(index)
        LOG.info("epoch %d: loss %.4f", epoch + 1, total / len(x))
    # BatchNorm's running statistics trail the weights (momentum 0.1 from mean 0, variance 1), far
    # behind after a short run: re-estimate them with the final weights, as an exact average.
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    if norms:
        with torch.no_grad():
            for start in range(0, len(x), options.batch_size):
                if len(x[start : start + options.batch_size]) >= 2:
                    model(x[start : start + options.batch_size])
    model.eval()


def _export(model, path: Path, size: int, multi_label: bool, check: np.ndarray) -> float:
    """ONNX with the probabilities baked in (SCORES like a head's); returns max |ONNX - PyTorch|."""
    import onnx
    import onnxruntime as ort
    import torch

    class Scores(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, pixels):
            logits = self.net(pixels)
            return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)

    wrapped = Scores(model).eval()
    torch.onnx.export(
        wrapped,
        torch.zeros(1, 3, size, size),
        str(path),
        input_names=["PIXELS"],
        output_names=["SCORES"],
        dynamic_axes={"PIXELS": {0: "batch"}, "SCORES": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    onnx.checker.check_model(str(path))
    with torch.no_grad():
        expected = wrapped(torch.from_numpy(check)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["SCORES"], {"PIXELS": check})[0]
    return float(np.abs(got - expected).max())


def _images_per_second(run, batch: int, min_s: float = 1.0) -> float:
    run()  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < min_s or done < 3 * batch:
        run()
        done += batch
    return done / (time.perf_counter() - started)


def _speeds(student_onnx: Path, size: int, repository, teacher) -> tuple[float, float]:
    import onnxruntime as ort

    from headmaster.repository.layout import encoder_artifact

    batch = 16
    spec = repository.card.towers["image"]
    student = ort.InferenceSession(str(student_onnx), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype(np.float32)
    student_rate = _images_per_second(lambda: student.run(["SCORES"], {"PIXELS": pixels}), batch)
    encoder = ort.InferenceSession(
        str(encoder_artifact(repository.path, "image", spec.format)), providers=["CPUExecutionProvider"]
    )
    dtype = np.uint8 if spec.input_dtype == "UINT8" else np.float32
    teacher_pixels = np.random.default_rng(0).integers(0, 255, size=(batch, *spec.input_dims)).astype(dtype)

    def teacher_run():
        embeddings = encoder.run([spec.output_name], {spec.input_name: teacher_pixels})[0]
        teacher.scores(embeddings)

    return student_rate, _images_per_second(teacher_run, batch)


def distill(options: DistillOptions, server: str | None = None) -> DistillReport:
    """Train, export, compare, time and publish a student of ``options.head``; see the module doc."""
    import torch

    from headmaster.export.heads import check_head_name
    from headmaster.repository import ab
    from headmaster.repository.head_version import HeadVersion
    from headmaster.repository.repo import Repository
    from headmaster.rules.threshold import accepted_mask, task_of
    from headmaster.served.student import preprocess
    from headmaster.store import open_store

    started = time.monotonic()
    repository = Repository(options.repo)
    name = check_head_name(options.name or f"{options.head}_student")
    if name in repository.head_names():
        raise RepositoryError(f"{name} is a head in {repository.path}; give the student another --name", option="name")
    if not 0.0 < options.val_fraction < 1.0 or options.epochs < 1:
        raise DataError("--val-fraction must be between 0 and 1 and --epochs at least 1", option="val_fraction")
    if not 0.0 <= options.min_agreement <= 1.0:
        raise DataError(
            f"the agreement floor is a share in [0, 1], not {options.min_agreement}", option="min_agreement"
        )
    ab.refuse_during_test(options.repo, options.head, "distill a student of")  # which version teaches?
    teacher = HeadVersion.load(repository, options.head)
    info = teacher.info
    if task_of(info) != "labels":  # the served student answers with the flat label rule
        raise DataError(
            f"head {options.head} is a {task_of(info)} head: distill makes students of label heads "
            "only (a hierarchy's paths, an ordinal class or a value are not served by a student)",
            option="head",
        )
    hashes, embeddings, images = stored_images(
        open_store(options.store, create=False), repository.fingerprint, options.max_items
    )
    targets = teacher.scores(embeddings).astype(np.float32)
    model, config = data_config(options.student, options.image_size, len(info["labels"]), options.pretrained)
    pixels = np.stack([preprocess(data, config) for data in images]).astype(np.float32)

    order = np.random.default_rng(options.seed).permutation(len(hashes))
    n_val = max(2, int(round(len(order) * options.val_fraction)))
    val, train = order[:n_val], order[n_val:]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    _train(model, pixels[train], targets[train], options, info["multi_label"])

    staging = Path(options.repo) / f".distill-{name}"
    staging.mkdir(exist_ok=True)
    onnx_path = staging / "model.onnx"
    onnx_diff = _export(model, onnx_path, config["size"], info["multi_label"], pixels[val])
    if onnx_diff > 1e-3:
        raise DataError(f"the exported student differs from PyTorch by {onnx_diff:.2g}", option="student")
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    student_scores = np.concatenate(
        [session.run(["SCORES"], {"PIXELS": pixels[i : i + 64]})[0] for i in range(0, len(pixels), 64)]
    )
    same_top = student_scores.argmax(1) == targets.argmax(1)
    same_labels = (accepted_mask(student_scores[val], info) == accepted_mask(targets[val], info)).all(axis=1)
    student_rate, teacher_rate = _speeds(onnx_path, config["size"], repository, teacher)

    report = DistillReport(
        name=name,
        version=0,
        teacher=f"{options.head} v{info['version']}",
        student=options.student,
        parameters=int(sum(p.numel() for p in model.parameters())),
        train_items=len(train),
        val_items=len(val),
        top1_agreement=float(same_top[val].mean()),
        label_agreement=float(same_labels.mean()),
        mean_abs_score_diff=float(np.abs(student_scores[val] - targets[val]).mean()),
        train_top1_agreement=float(same_top[train].mean()),
        onnx_max_diff=onnx_diff,
        student_img_s=round(student_rate, 1),
        teacher_img_s=round(teacher_rate, 1),
        seconds=round(time.monotonic() - started, 1),
        details={
            "epochs": options.epochs,
            "pretrained": options.pretrained,
            "image_size": config["size"],
            "store": str(options.store),
            "encoder": repository.fingerprint,
            "min_agreement": options.min_agreement,
        },
    )
    if not report.label_agreement >= options.min_agreement:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(
            f"the student {options.student} accepts the teacher's labels on {report.label_agreement:.1%} "
            f"of {report.val_items} held-out images (top-1 {report.top1_agreement:.1%}), below the floor "
            f"of {options.min_agreement:.1%}, so it is refused and nothing was published; train longer "
            "(--epochs), on more stored images or from pretrained weights, or lower the floor to publish "
            "it as it is",
            option="min_agreement",
        )

    card = {
        "name": name,
        "teacher": report.teacher,
        "architecture": options.student,
        "labels": list(info["labels"]),
        "thresholds": list(info["thresholds"]),
        "multi_label": bool(info["multi_label"]),
        "preprocessing": config,
        "report": report.to_dict(),
    }
    report.version = publish_student(options.repo, options.head, onnx_path, card, server=server)
    import shutil

    shutil.rmtree(staging, ignore_errors=True)
    return report


def publish_student(
    repo: Path, teacher: str, onnx_path: Path, card: dict, keep: int = STUDENT_KEEP, server: str | None = None
) -> int:
    """Publish the next version of the student ``card["name"]`` (its ``model.onnx`` at ``onnx_path``,
    ``card`` its student.json without the version) and load it, as one repository change: refused
    while its teacher runs an A/B or shadow test, checked before it is renamed into place
    (``validation.check_student_dir``), and, if the server refuses to load it, moved aside again
    (the previous version, if any, is then the newest on disk, the one Triton serves). Returns the
    version published."""
    import time

    from headmaster.lifecycle.change import RepositoryChange
    from headmaster.repository import ab
    from headmaster.repository.config import StudentModel
    from headmaster.repository.layout import copy_backend
    from headmaster.repository.publish import prune_versions, publish_version
    from headmaster.repository.validation import check_student_dir
    from headmaster.served.student import STUDENT_FILE

    name, labels = card["name"], len(card["labels"])
    ab.refuse_during_test(repo, teacher, "distill a student of")
    change = RepositoryChange.of(repo, server)
    with change:
        with change.phase() as repository:
            first = not (Path(repo) / name).exists()

            def build(folder: Path, version: int) -> None:
                (folder / "model.onnx").write_bytes(Path(onnx_path).read_bytes())
                numbered = {**card, "version": version, "report": {**card.get("report", {}), "version": version}}
                (folder / STUDENT_FILE).write_text(json.dumps(numbered, indent=2) + "\n")
                copy_backend("student", folder)
                check_student_dir(folder, name, version, labels)

            version = publish_version(repo, name, build)
            repository.write_config(StudentModel(name, labels, batching=_student_batching(repository)))
            prune_versions(repo, name, keep, protect={version})
        aside = Path(repo) / f".refused-{name}-{version}-{int(time.time())}"

        def put_back() -> None:
            with change.phase():
                (Path(repo) / (name if first else f"{name}/{version}")).rename(aside)
            if first:
                change.unload([name])
            else:
                change.load([name])  # Triton serves the newest version on disk: the previous one

        change.undo_with(f"the student {name} v{version} was moved aside to {aside}", put_back)
        change.load([name])
    return version


def _student_batching(repository):
    from headmaster.repository.config import Batching

    return Batching(min(16, repository.options.max_batch_size))
