"""Report cleaning as the report-generation field does it (the R2Gen ``clean_report_iu`` convention).

Lower-case; drop list numbering ("1. ", " 2. "); split into sentences on ". "; in each sentence remove
the punctuation R2Gen removes (``. , ? ; * ! % ^ & _ + ( ) : < = > @ [ ] { } " / \\ '``; hyphens and
digits stay); join sentences with `` . `` and end with `` .``. One difference, stated: R2Gen keeps
empty sentences (its emptiness test compares a string with a list and is always true), which leaves
``" .  . "`` artefacts; we drop them. The de-identification token ``XXXX`` becomes ``xxxx`` as in R2Gen.
"""

from __future__ import annotations

import re

_NUMBERING = re.compile(r"(^|\s)\d\.\s")
_REPEATED_DOTS = re.compile(r"\.{2,}")
_PUNCT = re.compile(r"[.,?;*!%^&_+():<=>@\[\]{}\"/\\']")
_SPACES = re.compile(r"\s+")


def clean_sentence(sentence: str) -> str:
    return _SPACES.sub(" ", _PUNCT.sub("", sentence.lower())).strip()


def split_raw(report: str) -> list[str]:
    text = _REPEATED_DOTS.sub(".", report.strip().lower())
    text = _NUMBERING.sub(". ", text)
    return text.split(". ")


def clean_report(report: str) -> str:
    """Return the cleaned report (``"the heart is normal . the lungs are clear ."``) or ``""``."""
    if not isinstance(report, str):
        raise TypeError(f"report must be a string, got {type(report).__name__}")
    sentences = [s for s in (clean_sentence(s) for s in split_raw(report)) if s]
    return " . ".join(sentences) + " ." if sentences else ""


def report_sentences(cleaned: str) -> list[str]:
    """Sentences of a report already passed through :func:`clean_report`."""
    return [s.strip() for s in cleaned.split(" .") if s.strip()]
