"""quality: drop low-quality documents with Gopher/C4 heuristics, then a fastText classifier.

Shard in, shard out over ``dedup.documents``. Every document first goes through the heuristics of
``stages.quality.rules`` under its language's rules (the ``language`` column that ingest writes picks
the entry of ``languages``; a shard without the column gets the ``default`` entry), and the first
rule it fails names its drop reason; the survivors are then
scored by a fastText classifier, and a score below ``classifier.threshold`` drops them with the
reason ``classifier``. Outputs:

- ``documents``: the kept documents, every input column plus ``quality_score`` (P(positive label),
  null when the classifier is off) and ``word_count`` (words as the heuristics count them, rounded:
  Han and kana letters count 1/chars_per_word each in zh and ja).
- ``dropped``: the dropped documents with the same columns plus ``drop_reason``; one (possibly
  empty) shard per input shard when ``write_dropped`` is true, an empty folder otherwise.

The classifier is either given (``classifier.model_path``, e.g. a DCLM-style fastText model) or
trained once, in the parent process, from ``classifier.positive``/``negative`` sample files (one
sample per line) into ``<output_dir>/classifier/model.bin``; a resumed attempt reuses that file.
The contents of the sample files, the model and the bad-words list are folded into the stage's
fingerprint (``Stage.external``), so editing them re-runs the stage. ``llmpipe plan`` and ``run``
check, before anything runs, that each can be read and starts like its kind (``input_problems``).

The shipped sample files are the embedded corpus's (``data/embedded/quality/``): paragraphs of Python
docstrings against generated junk. A classifier trained on them keeps pages that look like docstrings,
which is right for the embedded crawl and wrong for any other. So training on them while ``crawl``
(``data.warc``) reads anything but the embedded corpus is an error, at plan time and at run time
(``embedded_samples_problem``): give ``classifier.model_path`` (a fastText quality model for that
crawl) or set ``classifier.enabled: false`` to filter with the heuristics alone.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import Invalid, LlmpipeError, Stage, StageContext, one_or_many
from pipeline.files import atomic_path, write_json_atomic
from pipeline.inputs import NONEMPTY_TEXT, TEXT, Problem, file_problem
from stages.common.documents import read_documents as read_shard
from stages.common.documents import text_bytes, with_column
from stages.common.inputs import FASTTEXT_MODEL
from stages.common.shards import (
    ShardResult,
    ShardTask,
    Throughput,
    list_parquet,
    map_shards,
    workers_problem,
    write_parquet_atomic,
)
from stages.quality.rules import (
    DEFAULT_LANGUAGE,
    C4Config,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageRules,
    Rules,
    read_word_list,
)

CLASSIFIER_DIR = "classifier"  # under the stage's output dir: the trained model and its report
# Where `make corpus` builds the embedded corpus (python -m llmpipe.corpus data/embedded), relative to the
# project folder: conf/data/tiny.yaml reads its WARCs, conf/stage/quality/default.yaml its quality samples.
EMBEDDED_CORPUS = "data/embedded"
MODEL_FILE = "model.bin"
TRAIN_REPORT = "train.json"
# Files up to this size are fingerprinted by content, bigger ones (a multi-GB model) by size and mtime.


class QualityError(LlmpipeError):
    """Base of the quality stage's errors."""


class MissingPathError(QualityError):
    """A configured file does not exist."""


class ClassifierError(QualityError):
    """The classifier cannot be trained or used: empty samples, unreadable model, unknown label."""


class ShardSchemaError(QualityError):
    """An input shard lacks the string column ``text``."""


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    enabled: bool  # false: no classifier, quality_score is null
    model_path: str | None  # a trained fastText model (.bin); null: train one from positive/negative
    positive: str | None  # high-quality training samples, one per line
    negative: str | None  # low-quality training samples, one per line
    positive_label: str  # label whose probability is quality_score (DCLM's model uses hq)
    negative_label: str  # label given to the negative samples when training
    threshold: float  # documents with P(positive) below this are dropped (reason: classifier)
    validation_fraction: float  # share of each sample file held out to measure accuracy
    epoch: int  # fastText epoch
    lr: float  # fastText lr
    word_ngrams: int  # fastText wordNgrams
    dim: int  # fastText dim
    min_count: int  # fastText minCount
    bucket: int  # fastText bucket: hashed word n-gram rows; the model holds (words + bucket) x dim floats
    seed: int  # fastText seed and the seed of the train/validation split
    threads: int  # fastText thread; more is faster but makes training not repeatable

    def __post_init__(self) -> None:
        problems = []
        for key in ("positive_label", "negative_label"):
            label = getattr(self, key)
            if not label.startswith("__label__") or len(label.split()) != 1 or label == "__label__":
                problems.append((key, f"{label!r} must look like '__label__<name>' (fastText's label prefix)"))
        if self.positive_label == self.negative_label:
            problems.append(("", f"positive_label and negative_label are both {self.positive_label!r}"))
        if not 0.0 <= self.threshold <= 1.0:
            problems.append(("threshold", f"must be a probability in [0, 1], got {self.threshold}"))
        if not 0.0 <= self.validation_fraction < 1.0:
            problems.append(("validation_fraction", f"must be in [0, 1), got {self.validation_fraction}"))
        problems += [(key, f"must be >= 1, got {getattr(self, key)}")
                     for key in ("epoch", "word_ngrams", "dim", "bucket", "threads") if getattr(self, key) < 1]
        if self.lr <= 0:
            problems.append(("lr", f"must be > 0, got {self.lr}"))
        if self.enabled and not self.model_path and not (self.positive and self.negative):
            problems.append(("", f"set model_path, or both positive and negative sample files (got positive="
                                 f"{self.positive!r}, negative={self.negative!r}); or turn it off with enabled=false"))
        Invalid.check(problems)


@dataclass(frozen=True, kw_only=True)
class QualityConfig:
    gopher: GopherQualityConfig  # Gopher quality filter
    repetition: GopherRepetitionConfig  # Gopher repetition removal
    c4: C4Config  # C4 page rules
    # per language code of ingest's `language` column: stop words, word counting, word lengths; `default`
    # for every language without an entry (und included)
    languages: Mapping[str, LanguageRules]  # per-language rules
    classifier: ClassifierConfig  # fastText quality classifier
    write_dropped: bool  # write the dropped documents, with drop_reason, to the dropped artifact
    # The crawl the documents come from (data.warc); read only to check that the classifier's samples fit it
    # (execution-only: the documents themselves come from dedup.documents).
    crawl: tuple[str, ...] = one_or_many()
    workers: int | None  # processes; null: the allocation's or machine's CPUs (execution-only)

    def __post_init__(self) -> None:
        problems = []
        if DEFAULT_LANGUAGE not in self.languages:
            problems.append(("languages", f"has no {DEFAULT_LANGUAGE!r} entry: the rules for every language "
                                          f"without its own entry (und included)"))
        if problem := workers_problem(self.workers):
            problems.append(("workers", problem))
        Invalid.check(problems)
        # A plain dict: the schema's read-only mapping view cannot be pickled to the worker processes.
        object.__setattr__(self, "languages", dict(self.languages))


def run(cfg: QualityConfig, ctx: StageContext) -> dict[str, float]:
    """Filter every shard of dedup.documents; return counts per drop reason and throughput."""
    timer = Throughput()
    sources = list_parquet(ctx.input("dedup.documents"))
    if not sources:
        ctx.log.warning("dedup.documents at %s holds no Parquet shard", ctx.input("dedup.documents"))
    if cfg.c4.bad_words_file:
        existing_file(cfg.c4.bad_words_file, "stage.quality.c4.bad_words_file")
    metrics: dict[str, float] = {}
    if problem := embedded_samples_problem(cfg):
        raise ClassifierError(f"stage.quality.{problem[0]}: {problem[1]}")
    if cfg.classifier.enabled:
        metrics.update(prepare_classifier(cfg.classifier, ctx.output_dir, ctx.log))
    for artifact in ("documents", "dropped"):
        ctx.output(artifact).mkdir(parents=True, exist_ok=True)

    def progress(done: int, total: ShardResult) -> None:
        ctx.log_metrics({"docs_in": total.docs_in, "docs_out": total.docs_out}, step=done)

    total = map_shards(filter_shard, sources, ctx.output_dir, cfg, workers=cfg.workers, desc="quality",
                       phase="filter", on_progress=progress)
    metrics = {**total.metrics(timer.seconds), **metrics}
    ctx.log.info("quality: kept %d of %d documents; drops: %s", total.docs_out, total.docs_in,
                 dict(total.drops.most_common()))
    ctx.log_dataset("dedup.documents", ctx.input("dedup.documents"), rows=total.docs_in)  # MLflow lineage
    ctx.log_dataset("quality.documents", ctx.output("documents"), rows=total.docs_out, context="output")
    return metrics


# --- one shard (runs in a worker process) ---------------------------------------------------------

def filter_shard(task: ShardTask) -> ShardResult:
    """Check every document of one shard; write its kept and (optionally) dropped documents."""
    import pyarrow as pa

    cfg: QualityConfig = task.config
    table = read_documents(Path(task.source))
    texts = table.column("text").to_pylist()
    # Shards without the column (not written by ingest) are checked with the default entry.
    languages = table.column("language").to_pylist() if "language" in table.column_names else [None] * len(texts)
    rules = build_rules(cfg.gopher, cfg.repetition, cfg.c4, tuple(sorted(cfg.languages.items())))
    checked = [rules.check(t, lang) for t, lang in zip(texts, languages, strict=True)]
    reasons = [reason for reason, _ in checked]
    scores: list[float | None] = [None] * len(texts)
    if cfg.classifier.enabled:
        c = cfg.classifier
        model = load_classifier(model_file(c, task.output_dir), c.positive_label)
        survivors = [i for i, r in enumerate(reasons) if r is None]
        probs = positive_probabilities(model, [texts[i] for i in survivors], c.positive_label)
        for i, p in zip(survivors, probs, strict=True):
            scores[i] = p
            if p < c.threshold:
                reasons[i] = "classifier"

    table = with_column(table, "quality_score", pa.array(scores, pa.float32()))
    table = with_column(table, "word_count", pa.array([n for _, n in checked], pa.int32()))
    keep = pa.array([r is None for r in reasons], pa.bool_())
    kept = table.filter(keep)
    result = ShardResult(docs_in=table.num_rows, docs_out=kept.num_rows,
                         bytes_in=text_bytes(table), bytes_out=text_bytes(kept))
    result.drops.update(r for r in reasons if r is not None)
    write_parquet_atomic(kept, task.output_dir / "documents" / f"{task.name}.parquet")
    if cfg.write_dropped:
        dropped = table.filter(pa.array([r is not None for r in reasons], pa.bool_()))
        dropped = with_column(dropped, "drop_reason", pa.array([r for r in reasons if r is not None], pa.string()))
        write_parquet_atomic(dropped, task.output_dir / "dropped" / f"{task.name}.parquet")
    return result


def read_documents(path: Path) -> Any:
    """A documents shard as a pyarrow Table; it must have a string column ``text``."""
    return read_shard(path, ShardSchemaError)


@functools.lru_cache(maxsize=4)
def build_rules(gopher: GopherQualityConfig, repetition: GopherRepetitionConfig, c4: C4Config,
                languages: tuple[tuple[str, LanguageRules], ...]) -> Rules:
    """The heuristics, built once per process (the bad-words list is read here); ``languages`` as sorted
    (code, rules) pairs, which hash."""
    bad_words = read_word_list(Path(c4.bad_words_file)) if c4.bad_words_file else ()
    return Rules(gopher, repetition, c4, dict(languages), bad_words)


# --- the classifier -------------------------------------------------------------------------------

_MODELS: dict[str, Any] = {}  # per process: a model is loaded once, not once per shard


def model_file(c: ClassifierConfig, output_dir: Path) -> Path:
    """The model the shards are scored with: the given one, or the one trained into the output dir."""
    return Path(c.model_path) if c.model_path else Path(output_dir) / CLASSIFIER_DIR / MODEL_FILE


def load_classifier(path: Path, positive_label: str) -> Any:
    """Load a fastText model once per process and check that it knows ``positive_label``."""
    key = str(path)
    if key not in _MODELS:
        import fasttext

        try:
            model = fasttext.load_model(key)
        except ValueError as exc:
            raise ClassifierError(f"cannot load fastText model {path}: {exc}") from exc
        if positive_label not in model.labels:
            raise ClassifierError(f"fastText model {path} has no label {positive_label!r} "
                                  f"(it has {list(model.labels)}); set stage.quality.classifier.positive_label")
        _MODELS[key] = model
    return _MODELS[key]


def one_line(text: str) -> str:
    """fastText predicts on one line: newlines (and runs of any whitespace) become one space."""
    return " ".join(text.split())


def positive_probabilities(model: Any, texts: list[str], positive_label: str) -> list[float]:
    """P(positive_label) for each text, in one batched call."""
    if not texts:
        return []
    labels, probs = model.predict([one_line(t) for t in texts], k=-1)
    out = []
    for names, values in zip(labels, probs, strict=True):
        p = next((float(v) for name, v in zip(names, values, strict=True) if name == positive_label), 0.0)
        out.append(min(max(p, 0.0), 1.0))  # fastText's softmax adds a small epsilon
    return out


def prepare_classifier(c: ClassifierConfig, output_dir: Path, log: logging.Logger) -> dict[str, float]:
    """Make sure the model to score with exists and is usable; return its training metrics, if any.

    A given ``model_path`` is loaded here too, so a bad file or label fails before any shard runs.
    A trained model is reused when a previous attempt left it (with its report) in the output dir.
    """
    key = "stage.quality.classifier"  # run-time errors name the key to change; config errors come from the schema
    if c.model_path:
        path = existing_file(c.model_path, f"{key}.model_path")
        if c.positive or c.negative:
            log.info("classifier: using %s; %s.positive/negative are ignored", path, key)
        load_classifier(path, c.positive_label)
        return {}
    # ClassifierConfig holds either model_path or both sample files.
    model_dir = Path(output_dir) / CLASSIFIER_DIR
    model, report = model_dir / MODEL_FILE, model_dir / TRAIN_REPORT
    if model.is_file() and report.is_file():
        log.info("classifier: reusing %s from the previous attempt", model)
        return json.loads(report.read_text())["metrics"]
    positive = read_samples(existing_file(c.positive, f"{key}.positive"), f"{key}.positive")
    negative = read_samples(existing_file(c.negative, f"{key}.negative"), f"{key}.negative")
    return train_classifier(c, positive, negative, model_dir, log)


def read_samples(path: Path, key: str) -> list[str]:
    """Non-blank lines of a sample file, whitespace normalised."""
    samples = [s for s in (one_line(line) for line in path.read_text(encoding="utf-8").splitlines()) if s]
    if not samples:
        raise ClassifierError(f"{key}: {path} holds no sample (expected one text per line)")
    return samples


def train_classifier(c: ClassifierConfig, positive: list[str], negative: list[str], model_dir: Path,
                     log: logging.Logger) -> dict[str, float]:
    """Train a fastText model on the samples, minus a held-out share of each class used to measure accuracy.

    Writes ``model.bin`` last (atomically), after ``train.json``: a model file means a finished training.
    """
    import fasttext

    rng = random.Random(c.seed)
    pos_train, pos_val = split_holdout(positive, c.validation_fraction, rng)
    neg_train, neg_val = split_holdout(negative, c.validation_fraction, rng)
    rows = [f"{c.positive_label} {s}" for s in pos_train] + [f"{c.negative_label} {s}" for s in neg_train]
    rng.shuffle(rows)  # fastText reads the file in order; mixed classes train better
    model_dir.mkdir(parents=True, exist_ok=True)
    train_file = model_dir / "train.txt"
    train_file.write_text("\n".join(rows) + "\n", encoding="utf-8")
    log.info("classifier: training fastText on %d positive and %d negative samples", len(pos_train), len(neg_train))
    try:
        model = fasttext.train_supervised(input=str(train_file), epoch=c.epoch, lr=c.lr, wordNgrams=c.word_ngrams,
                                          dim=c.dim, minCount=c.min_count, bucket=c.bucket, seed=c.seed,
                                          thread=c.threads, verbose=0)
    finally:
        train_file.unlink(missing_ok=True)
    metrics: dict[str, float] = {"classifier_train_samples": len(rows),
                                 "classifier_val_samples": len(pos_val) + len(neg_val)}
    if pos_val or neg_val:
        p_pos = positive_probabilities(model, pos_val, c.positive_label)
        p_neg = positive_probabilities(model, neg_val, c.positive_label)
        correct = sum(p >= c.threshold for p in p_pos) + sum(p < c.threshold for p in p_neg)
        metrics["classifier_val_accuracy"] = correct / (len(p_pos) + len(p_neg))
        log.info("classifier: held-out accuracy %.3f on %d samples", metrics["classifier_val_accuracy"],
                 metrics["classifier_val_samples"])
    report = {"labels": [c.positive_label, c.negative_label], "metrics": metrics}
    write_json_atomic(model_dir / TRAIN_REPORT, report, indent=2)
    with atomic_path(model_dir / MODEL_FILE) as tmp:
        model.save_model(str(tmp))
        check_saved(model, tmp)
    return metrics


def check_saved(model: Any, path: Path) -> None:
    """Read a just-saved fastText model back before it is published.

    fastText does not report a short write (a full disk), and loads a cut-short file without a word:
    every later attempt would reuse it and fail with "Vector::mul: size mismatch", or, cut by a few
    bytes, classify with a damaged model. The output matrix is the last thing in the file, so a file
    cut anywhere loses part of it (or fails to load).
    """
    import fasttext
    import numpy as np

    try:
        expected = np.ascontiguousarray(model.get_output_matrix(), dtype=np.float32).tobytes()
        saved = fasttext.load_model(str(path))
        whole = np.array_equal(saved.get_output_matrix(), model.get_output_matrix())
        # A file cut by a few bytes loads with the missing floats read as zeros, which can equal what
        # was trained: the file's tail must be the output matrix itself, byte for byte.
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - len(expected)))
            whole = whole and f.read() == expected
    except (ValueError, MemoryError, RuntimeError) as exc:
        raise ClassifierError(f"the trained fastText model was not saved whole to {path}: {exc}") from exc
    if not whole:
        raise ClassifierError(f"the trained fastText model was not saved whole to {path} "
                              f"({path.stat().st_size} bytes): its output matrix differs when read back")


def split_holdout(samples: list[str], fraction: float, rng: random.Random) -> tuple[list[str], list[str]]:
    """(train, held out): a seeded shuffle, then the first ``fraction`` held out (at least one when > 0)."""
    shuffled = samples[:]
    rng.shuffle(shuffled)
    n_val = max(1, round(fraction * len(shuffled))) if fraction > 0 and len(shuffled) > 1 else 0
    return shuffled[n_val:], shuffled[:n_val]


# --- paths and fingerprints -----------------------------------------------------------------------

def existing_file(path: str, key: str) -> Path:
    """``path`` (relative to the working directory, the project folder) if it is a file, else a named error."""
    p = Path(path)
    if not p.is_file():
        raise MissingPathError(f"{key}: file not found: {path} (resolved to {p.resolve()})")
    return p


def file_state(path: str) -> str:
    """The digest of a file's content for the fingerprint (pipeline/content.py: cached by stat), or
    ``missing``."""
    from pipeline.content import MISSING, content_digest

    return content_digest(path) if Path(path).is_file() else MISSING


def outside_files(cfg: QualityConfig) -> dict[str, str]:
    """The files the config points to and the stage reads, by config key."""
    files: dict[str, str] = {}
    if cfg.c4.bad_words_file:
        files["c4.bad_words_file"] = cfg.c4.bad_words_file
    c = cfg.classifier
    if c.enabled:
        keys = ("model_path",) if c.model_path else ("positive", "negative")
        for key in keys:
            if getattr(c, key):
                files[f"classifier.{key}"] = getattr(c, key)
    return files


def external_state(cfg: QualityConfig) -> dict[str, str] | None:
    """The state of the files the config points to: their edits must re-run the stage."""
    return {key: file_state(path) for key, path in outside_files(cfg).items()} or None


# What each outside file must start like: sample files hold text (at least one sample).
_KINDS = {"c4.bad_words_file": TEXT, "classifier.model_path": FASTTEXT_MODEL, "classifier.positive": NONEMPTY_TEXT,
          "classifier.negative": NONEMPTY_TEXT}


def _in_folder(spec: str, folder: Path) -> bool:
    """Whether a local path or glob lies in ``folder`` (relative paths: from the project folder); URLs never do."""
    if "://" in spec:
        return False
    return Path(spec).expanduser().resolve().is_relative_to(folder.resolve())


def embedded_samples_problem(cfg: QualityConfig) -> Problem | None:
    """The classifier would be trained on the embedded corpus's samples for a crawl that is not the embedded
    corpus (see the module doc); None when it would not."""
    c = cfg.classifier
    if not c.enabled or c.model_path:
        return None
    embedded = Path(EMBEDDED_CORPUS)
    samples = [key for key in ("positive", "negative") if getattr(c, key) and _in_folder(getattr(c, key), embedded)]
    other = [spec for spec in cfg.crawl if not _in_folder(spec, embedded)]
    if not samples or not other:
        return None
    given = " and ".join(f"{key}={getattr(c, key)}" for key in samples)
    return ("classifier", f"would be trained on the embedded corpus's samples ({given}: Python docstring "
                          f"paragraphs against generated junk) to filter a crawl that is not the embedded corpus "
                          f"(data.warc: {', '.join(other)}); on web pages it keeps those that look like docstrings. "
                          f"Give stage.quality.classifier.model_path a fastText quality model for this crawl (and "
                          f"its positive_label), or set stage.quality.classifier.enabled=false to filter with the "
                          f"heuristics alone")


def input_problems(cfg: QualityConfig) -> list[Problem]:
    """The stage's ``preflight`` (run by ``plan`` and ``run``): every file the config points to is
    readable and of its kind (a fastText model by its magic bytes, sample and word lists as UTF-8 text),
    and the classifier's samples fit the crawl (``embedded_samples_problem``)."""
    problems = [(key, problem) for key, path in outside_files(cfg).items()
                if (problem := file_problem(path, _KINDS[key]))]
    mismatch = embedded_samples_problem(cfg)
    return [*problems, mismatch] if mismatch else problems


STAGE = Stage(
    name="quality",
    config=QualityConfig,
    run=run,
    inputs=("dedup.documents",),
    outputs=("documents", "dropped"),
    unhashed=frozenset(["workers", "crawl"]),
    resumable=True,
    shard_phases=("filter",),  # on Slurm: one job array over the shards, then the final job
    external=external_state,
    preflight=input_problems,
    description="Heuristic and fastText quality filtering.",
    version=2,  # 2: per-language rules (languages); CJK words counted from characters
)
