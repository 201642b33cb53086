"""Natural-language-generation (NLG) metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr via pycocoevalcap 1.2.

Protocol ``"r2gen"`` (the default, the R2Gen / R2GenGPT / AM-MRG convention)
---------------------------------------------------------------------------
R2Gen (``modules/tester.py`` and ``modules/metrics.py`` of zhjohnchan/R2Gen) and R2GenGPT
(``models/R2GenGPT.py::score``) pass ``{i: [reference]}`` / ``{i: [hypothesis]}`` dicts straight to
the pycocoevalcap scorers, without the PTB tokenizer.  Texts are expected to have been cleaned by
the caller's report cleaner already (punctuation split off as its own tokens, lower case).  Here:

* each text is lower-cased and its whitespace collapsed (``" ".join(text.lower().split())``), so
  tokens are exactly the whitespace-separated words; punctuation the cleaner kept stays a token;
* exactly one reference per hypothesis; references are **never truncated** (R2Gen scores against
  references decoded from its own token ids, i.e. cut at ``max_seq_length`` and with OOV words as
  ``<unk>``; R2GenGPT cuts them at the LLM tokenizer's ``max_length``; this module does neither);
* BLEU_n: ``Bleu(4)`` corpus-level BLEU (clipped n-gram counts and lengths summed over the corpus,
  brevity penalty from the summed "closest" reference lengths; pycocoevalcap adds 1e-15 to the
  matches and 1e-9 to the guesses, so a zero n-gram match gives a tiny positive score, not 0);
* METEOR: Meteor 1.5 (``-l en -norm``) corpus-level aggregate (one ``EVAL`` over all segment
  statistics, not the mean of segment scores);
* ROUGE_L: mean over reports of the LCS F-measure with beta = 1.2;
* CIDEr: pycocoevalcap's ``Cider`` (CIDEr-D: clipped tf-idf n-grams n = 1..4, Gaussian length
  penalty sigma = 6, scaled by 10).  The idf comes from the evaluated references, so scores depend
  on the whole corpus: an identical corpus of >= 2 distinct reports of >= 4 tokens scores 10.0,
  reports shorter than 4 tokens lose the missing n-gram orders (a 3-token one scores at most 7.5),
  and a 1-report corpus is degenerate (every idf is log(1) - log(1) = 0, so CIDEr is 0.0).

Empty hypotheses ("" or whitespace only) are passed through as empty strings: pycocoevalcap 1.2
accepts them in all four scorers (checked in ``tests/test_metrics.py``): they add no matched and no
guessed n-grams to BLEU (only lowering the brevity penalty), and score 0 in METEOR, ROUGE-L and
CIDEr.  This is exact and is what R2Gen does with an empty decoded report, so no placeholder token
is substituted (a placeholder would add a spurious unigram guess and token of length to BLEU).

Protocol ``"ptb"``: the COCO caption convention: both sides go through pycocoevalcap's
``PTBTokenizer`` (Stanford CoreNLP 3.4.1: PTB tokenization, lower case, punctuation removed)
before the same scorers.  Needs Java.

METEOR and PTB need a Java runtime >= 8 on PATH; it is checked with ``shutil.which("java")``
first. The METEOR Java process is always shut down after use.
"""

from __future__ import annotations

import shutil
from importlib import metadata
from typing import Any

from .registry import NLG_KEYS

TOKENIZATIONS: tuple[str, ...] = ("r2gen", "ptb")
_JAVA_FIX = "install a Java runtime >= 8, e.g. apt-get install default-jre-headless, or set meteor=False"


def protocol(tokenization: str = "r2gen", meteor: bool = True) -> dict[str, Any]:
    """A small JSON-able description of the NLG protocol, to be written next to the scores."""
    _check_tokenization(tokenization)
    try:
        version = metadata.version("pycocoevalcap")
    except metadata.PackageNotFoundError:  # pragma: no cover - pycocoevalcap is a dependency
        version = "unknown"
    if tokenization == "r2gen":
        tok = "lower-case, collapse whitespace, split on whitespace (no PTB tokenizer)"
    else:
        tok = "pycocoevalcap PTBTokenizer (Stanford CoreNLP 3.4.1, lower-case, punctuation removed)"
    desc: dict[str, Any] = {
        "name": tokenization,
        "library": f"pycocoevalcap {version}",
        "tokenization": tok,
        "references_per_hypothesis": 1,
        "references_truncated": False,
        "empty_hypothesis": "kept as an empty string (no placeholder); scores 0",
        "BLEU": "Bleu(4) corpus-level, closest reference length, pycocoevalcap epsilons",
        "METEOR": "Meteor 1.5 -l en -norm, corpus-level aggregate" if meteor else "skipped",
        "ROUGE_L": "mean over reports of LCS F-measure, beta=1.2",
        "CIDEr": "pycocoevalcap Cider (CIDEr-D, n=4, sigma=6, x10), idf from the evaluated references",
    }
    return desc


def nlg_scores(
    references: list[str],
    hypotheses: list[str],
    tokenization: str = "r2gen",
    meteor: bool = True,
) -> dict[str, float]:
    """Corpus NLG scores of ``hypotheses`` against ``references`` (one reference per hypothesis).

    Returns ``{"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"}`` as floats;
    ``METEOR`` is omitted when ``meteor=False``.  See the module docstring for the protocol.

    Raises ``ValueError`` on a length mismatch, an empty corpus, non-string items or an unknown
    ``tokenization``; ``RuntimeError`` when Java is needed (METEOR, PTB) but not found.
    """
    _check_tokenization(tokenization)
    if problem := java_problem(tokenization, meteor):
        raise RuntimeError(f"{problem}: {_JAVA_FIX}")
    refs, hyps = prepare_texts(references, hypotheses, tokenization)
    gts = {i: [r] for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        out[f"BLEU_{n}"] = float(value)
    if meteor:
        out["METEOR"] = _meteor(gts, res)
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return {k: out[k] for k in NLG_KEYS if k in out}


def prepare_texts(references: list[str], hypotheses: list[str],
                  tokenization: str = "r2gen") -> tuple[list[str], list[str]]:
    """Validate and normalise both sides as the protocol says, before any scorer sees them: the texts
    whose whitespace-separated tokens every scorer (and :mod:`amrg.metrics.bootstrap`) counts."""
    _check_tokenization(tokenization)
    refs, hyps = list(references), list(hypotheses)
    if len(refs) != len(hyps):
        raise ValueError(
            f"need exactly one reference per hypothesis: got {len(refs)} references and {len(hyps)} hypotheses"
        )
    if not refs:
        raise ValueError("cannot score an empty corpus (0 hypotheses)")
    for name, texts in (("references", refs), ("hypotheses", hyps)):
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"{name} must be strings; items {bad[:5]} are {type(texts[bad[0]]).__name__}")

    # Collapsing whitespace also removes newlines and other line separators, which would break
    # METEOR's line protocol and the PTB tokenizer's one-line-per-text alignment.
    refs = [" ".join(t.split()) for t in refs]
    hyps = [" ".join(t.split()) for t in hyps]
    if tokenization == "ptb":
        refs, hyps = _ptb_tokenize(refs), _ptb_tokenize(hyps)
    else:
        refs, hyps = [t.lower() for t in refs], [t.lower() for t in hyps]
    return refs, hyps


def _check_tokenization(tokenization: str) -> None:
    if tokenization not in TOKENIZATIONS:
        raise ValueError(f"unknown tokenization {tokenization!r}; allowed: {', '.join(TOKENIZATIONS)}")


def java_problem(tokenization: str = "r2gen", meteor: bool = True) -> str | None:
    """Why these NLG settings cannot run here (METEOR or PTB without a ``java`` on PATH), or None."""
    if (meteor or tokenization == "ptb") and shutil.which("java") is None:
        what = "METEOR" if meteor else "the PTB tokenizer"
        return f"{what} needs Java, but no 'java' executable is on PATH"
    return None


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    """Corpus METEOR with pycocoevalcap's Meteor wrapper; its Java process is always shut down."""
    from pycocoevalcap.meteor.meteor import Meteor

    # "|||" is METEOR's field separator: the wrapper strips it from hypotheses but not references.
    gts = {k: [r.replace("|||", " ") for r in v] for k, v in gts.items()}
    scorer = Meteor()
    proc = scorer.meteor_p
    try:
        score, _ = scorer.compute_score(gts, res)
        return float(score)
    except (ValueError, OSError) as exc:  # java died or printed something unexpected
        proc.kill()
        err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
        raise RuntimeError(f"METEOR (java -jar meteor-1.5.jar) failed: {exc}; stderr: {err}") from exc
    finally:
        _close_meteor(scorer)


def _close_meteor(scorer: Any) -> None:
    proc = scorer.meteor_p
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    # Meteor.__del__ later closes/kills again: a no-op on a closed pipe and a reaped process.


def _ptb_tokenize(texts: list[str]) -> list[str]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenized = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    if sorted(tokenized) != list(range(len(texts))) or any(len(v) != 1 for v in tokenized.values()):
        raise RuntimeError("PTBTokenizer returned misaligned output (one line per text was expected)")
    return [tokenized[i][0] for i in range(len(texts))]


def distinct_ratio(texts: list[str]) -> float:
    """The share of distinct texts among ``texts`` (1/N when one report is written for every study: template
    collapse, whatever BLEU says); the template guard's statistic, 0.0 for no texts."""
    return len(set(texts)) / max(len(texts), 1)
