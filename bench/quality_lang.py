"""Language-aware quality (issue 14, item 2): keep rates per language and throughput, before and after.

The data: tests/fixtures/multilingual (man pages and gettext catalogs translated by people, each with its
English original; see its build.py). "Before" is the code of ``--old-ref`` (default: the commit before
language-aware quality), read with ``git show`` into temporary modules, never a committed copy:

- language id: ingest's ``detect_language`` (before: a stop-word counter over 7 languages; now py3langid,
  or ``--language-model`` for a fastText file) on every translated page and the English originals of the
  German pages: accuracy per language and docs/s (the model load is not timed; 2,000 characters now).
- quality: the stage's heuristics (``Rules.check``, the shipped conf/stage/quality/default.yaml of each
  side, which is what the stage runs per document; the classifier is unchanged and not part of this) on
  every translated page and every English original, in one process: keep rate per language, of the
  translations and of their originals, and docs/s. Now, each translation is checked under the language
  that the new language id gave it, as in the pipeline; the originals under theirs.

The acceptance measure: a language's translations are kept at its originals' rate, within 0.10.

Run: ``.venv/bin/python bench/quality_lang.py [--old-ref REV] [--repeat N]``. Prints a table; exit 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The last commit whose quality rules and language id were English-only.
OLD_REF = "b9a216238c9d08495be072d6d4340f45308cacd8"
MARGIN = 0.10


def old_module(ref: str, path: str, name: str, tmp: Path) -> ModuleType:
    """``path`` as it was at ``ref``, imported as module ``name`` from a temporary file."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:{path}"], capture_output=True, text=True,
                            check=True).stdout
    file = tmp / f"{name}.py"
    file.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def old_rules(ref: str, tmp: Path) -> Any:
    """The old Rules with the old shipped thresholds."""
    import yaml

    from pipeline.schema import build

    rules = old_module(ref, "stages/quality/rules.py", "_old_quality_rules", tmp)
    conf = yaml.safe_load(subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:conf/stage/quality/default.yaml"],
                                         capture_output=True, text=True, check=True).stdout)
    blocks = {key: build(cls, conf[key], path=f"stage.quality.{key}") for key, cls in
              (("gopher", rules.GopherQualityConfig), ("repetition", rules.GopherRepetitionConfig),
               ("c4", rules.C4Config))}
    return rules.Rules(blocks["gopher"], blocks["repetition"], blocks["c4"])


def new_rules() -> Any:
    from llmpipe.project import stage_config
    from stages.quality.stage import build_rules

    cfg = stage_config("quality", conf="base")  # the published thresholds (tiny.yaml relaxes three)
    return build_rules(cfg.gopher, cfg.repetition, cfg.c4, tuple(sorted(cfg.languages.items())))


def timed(fn, items: list, repeat: int) -> tuple[list, float]:
    """(results, docs/s): the best of ``repeat`` runs over ``items``."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = [fn(*item) for item in items]
        best = min(best, time.perf_counter() - start)
    return out, len(items) / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-ref", default=OLD_REF, help="git revision of the code before (default: %(default)s)")
    parser.add_argument("--language-model", default=None, help="a fastText language-id model for the new side")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the best counts")
    args = parser.parse_args()

    from stages.ingest import stage as ingest
    from tests.fixtures.multilingual import load_pages

    pages = load_pages()
    with tempfile.TemporaryDirectory() as tmp:
        old_ingest = old_module(args.old_ref, "stages/ingest/stage.py", "_old_ingest_stage", Path(tmp))
        rules_before = old_rules(args.old_ref, Path(tmp))
    rules_now = new_rules()

    # Language id: every translation, and the English originals once (those of the German pages).
    docs = [(p["lang"], p["text"]) for p in pages] + [("en", p["en"]) for p in pages if p["locale"] == "de"]
    ingest.detect_language("warm up: load the model", args.language_model)
    ids_old, lid_old_rate = timed(lambda _, text: old_ingest.detect_language(text, None)[0], docs, args.repeat)
    ids_new, lid_new_rate = timed(lambda _, text: ingest.detect_language(text, args.language_model)[0], docs,
                                  args.repeat)
    total = Counter(lang for lang, _ in docs)
    right_old = Counter(lang for (lang, _), got in zip(docs, ids_old, strict=True) if got == lang)
    right_new = Counter(lang for (lang, _), got in zip(docs, ids_new, strict=True) if got == lang)

    # Quality: translations under their detected language, originals under theirs (now); no language (before).
    detect = {text: ingest.detect_language(text, args.language_model)[0]
              for p in pages for text in (p["text"], p["en"])}
    n = len(pages)
    translations, originals = [(p["text"],) for p in pages], [(p["en"],) for p in pages]
    speed: dict[str, tuple[float, float]] = {}
    kept_old: list[bool] = []
    kept_new: list[bool] = []
    for name, checks in (("translations", translations), ("English originals", originals)):
        old, old_rate = timed(lambda text: rules_before.check(text)[0] is None, checks, args.repeat)
        new, new_rate = timed(lambda text: rules_now.check(text, detect[text])[0] is None, checks, args.repeat)
        kept_old += old
        kept_new += new
        speed[name] = (old_rate, new_rate)

    def rates(kept: list[bool], lang: str) -> tuple[float, float]:
        idx = [i for i, p in enumerate(pages) if p["lang"] == lang]
        return sum(kept[i] for i in idx) / len(idx), sum(kept[n + i] for i in idx) / len(idx)

    langs = sorted({p["lang"] for p in pages})
    print(f"tests/fixtures/multilingual: {n} translated pages in {len(langs)} languages with their English originals; "
          f"before = {args.old_ref[:12]}, now = the working tree\n")
    print(f"{'lang':5} {'pages':>5}  {'keep before':>17}  {'keep now':>17}  {'now within':>10}  "
          f"{'lang id before':>14}  {'lang id now':>11}")
    print(f"{'':5} {'':>5}  {'transl. / orig.':>17}  {'transl. / orig.':>17}  {MARGIN:>10.2f}")
    misses = []
    for lang in langs:
        before, now = rates(kept_old, lang), rates(kept_new, lang)
        ok = abs(now[0] - now[1]) <= MARGIN
        misses += [] if ok else [lang]
        print(f"{lang:5} {total[lang]:>5}  {before[0]:>8.2f} / {before[1]:.2f}  {now[0]:>8.2f} / {now[1]:.2f}  "
              f"{'yes' if ok else 'NO':>10}  {right_old[lang]:>8}/{total[lang]:<5}  "
              f"{right_new[lang]:>5}/{total[lang]:<5}")
    print(f"{'en':5} {total['en']:>5}  {'':>17}  {'':>17}  {'':>10}  {right_old['en']:>8}/{total['en']:<5}  "
          f"{right_new['en']:>5}/{total['en']:<5}")
    all_old, all_new = sum(right_old.values()) / len(docs), sum(right_new.values()) / len(docs)
    print(f"\nlanguage id accuracy: before {all_old:.3f}, now {all_new:.3f} "
          f"({args.language_model or 'py3langid'})")
    print(f"language id docs/s (one process, best of {args.repeat}): before {lid_old_rate:,.0f}, "
          f"now {lid_new_rate:,.0f}")
    for name, (old_rate, new_rate) in speed.items():
        print(f"quality heuristics docs/s on the {n} {name} (one process, best of {args.repeat}): "
              f"before {old_rate:,.0f}, now {new_rate:,.0f}")
    print("  (before, most translations stopped at the cheap stop-word or word-count rules; now they pass on to the\n"
          "   repetition rules like their originals, over characters for zh and ja)")
    print(f"languages outside the margin now: {', '.join(misses) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
