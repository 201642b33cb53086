"""Report cleaning as the report-generation field does it: R2Gen's two cleaners (``modules/tokenizers.py`` of
github.com/cuhksz-nlp/R2Gen), ``clean_report_iu_xray`` and ``clean_report_mimic_cxr``, rewritten.

What R2Gen does (read from its code)
------------------------------------
``clean_report_iu_xray(report)``:

1. ``'..' -> '.'`` three times (a run of up to 8 dots becomes one); delete ``'1. '`` *anywhere* (also inside
   ``"L1. "`` or ``"11. "``); ``'. 2. '`` ... ``'. 5. '`` and then ``' 2. '`` ... ``' 5. '`` -> ``'. '``;
   ``strip()``, ``lower()``, ``split('. ')``.
2. Each sentence: delete ``" / \\ '``, ``strip()``, ``lower()``, then delete the characters of the regex class
   ``[.,?;*!%^&_+():-\\[\\]{}]``. Read as a regex, that class is the literals ``. , ? ; * ! % ^ & _ + ( )``,
   the *range* ``:-\\[`` (U+003A..U+005B: ``: ; < = > ? @ A-Z [``), and ``] { }``. The range starts at ``:``
   (0x3A), not at ``)``, and ``-`` is its operator, not a member: digits (0x30-0x39), ``-`` (0x2D) and the
   rest of ``#$'*+,-./`` below ``:`` are *not* in it. So digits and hyphens stay (``"t-spine"``, ``"10"``);
   ``A-Z`` is moot because the sentence is lower-cased first. No whitespace is collapsed.
3. Keep every sentence (the test ``sent_cleaner(sent) != []`` compares a string with a list: always true),
   join with ``' . '``, append ``' .'``.

``clean_report_mimic_cxr(report)`` is the same with step 1 preceded by: ``'\\n' -> ' '``; ``'__' -> '_'``
seven times (a run of up to 128 underscores becomes one); ``'  ' -> ' '`` six times (a run of up to 64
spaces becomes one); and ``'..' -> '.'`` eight times instead of three (runs of up to 256 dots).

What this module does
---------------------
``iu``: strip, lower-case, one ``.`` for any run of dots, list numbering ``(^|whitespace)<digit>. `` ->
``". "`` (a sentence break), ``split('. ')``; in each sentence delete exactly R2Gen's character set
(``. , ? ; * ! % ^ & _ + ( ) : < = > @ [ ] { } " / \\ '``; digits and hyphens stay, as in R2Gen), collapse
whitespace, strip; drop empty sentences; join with `` . `` and end with `` .``. ``mimic``: first any run of
whitespace (newlines included) -> one space and any run of underscores -> one ``_``, then ``iu``. The
de-identification tokens become ``xxxx`` (IU X-ray's ``XXXX``) and nothing (MIMIC's ``___``) as in R2Gen.

Every difference from R2Gen, stated (the choices are ours; ``tests/test_clean.py`` pins them)
--------------------------------------------------------------------------------------------
- Empty sentences are dropped (R2Gen keeps them: ``"... visualized .  ."`` for a report ending ``". ."``);
  an empty report is ``""`` (R2Gen: ``" ."``).
- Whitespace inside a sentence is collapsed to single spaces after punctuation removal (R2Gen leaves
  ``"normal  old "`` for ``"normal ( old )"``): the same tokens under ``str.split()``, which R2Gen tokenizes
  with. ``iu`` keeps a newline inside a sentence as a space (R2Gen keeps the ``\\n``; same tokens).
- Any run of dots, spaces, underscores collapses to one (R2Gen ``iu``: dots up to 8; ``mimic``: dots up to
  256, spaces up to 64, underscores up to 128). ``mimic`` treats every whitespace character (``\\r``, tab,
  no-break space) like ``\\n``; R2Gen only ``\\n`` and ``' '``. Collapsing underscores changes nothing:
  ``_`` is deleted from every sentence anyway.
- Numbering: a single digit 0-9 after the start or any whitespace, then ``". "``, is a sentence break.
  R2Gen wants a space before it (``iu``: ``"normal\\n2. lungs"`` -> ``"normal\\n2 . lungs ."``), deletes
  ``"1. "`` anywhere, which glues words (``"body of L1. A CT"`` -> ``"body of la ct ."``) and makes
  ``"a 1. b"`` one sentence, handles only 2-5 otherwise and keeps 6-9 and 0 as tokens (``"x 6. foo"`` ->
  ``"x 6 . foo ."``; here ``"x . foo ."``). Unspaced numbering (CheXpert Plus's ``"1.TRACHEOSTOMY"``) is
  numbering for neither: it becomes ``"1tracheostomy"``, as in R2Gen.

On the 2,955 reports of ``data/iu_xray/annotation.json``, ``iu`` differs from R2Gen's output in 14 strings,
12 of them in tokens: 11 are R2Gen's empty-sentence artefact, 1 is its ``"L1. "`` glue.
"""

from __future__ import annotations

import re

_NUMBERING = re.compile(r"(^|\s)\d\.\s")
_REPEATED_DOTS = re.compile(r"\.{2,}")
_PUNCT = str.maketrans("", "", ".,?;*!%^&_+():<=>@[]{}\"/\\'")  # R2Gen's set (module docstring)
_SPACES = re.compile(r"\s+")
_UNDERSCORES = re.compile(r"_{2,}")

CLEANERS = ("iu", "mimic")


def clean_sentence(sentence: str) -> str:
    return " ".join(sentence.lower().translate(_PUNCT).split())


def split_raw(report: str) -> list[str]:
    text = report.strip().lower()
    text = _REPEATED_DOTS.sub(".", text) if ".." in text else text
    text = _NUMBERING.sub(". ", text)
    return text.split(". ")


def clean_report(report: str, cleaner: str = "iu") -> str:
    """Return the cleaned report (``"the heart is normal . the lungs are clear ."``) or ``""``.

    ``cleaner``: ``iu`` (R2Gen's ``clean_report_iu_xray``) or ``mimic`` (``clean_report_mimic_cxr``)."""
    if cleaner not in CLEANERS:
        raise ValueError(f"unknown report cleaner {cleaner!r}; known: {list(CLEANERS)}")
    if not isinstance(report, str):
        raise TypeError(f"report must be a string, got {type(report).__name__}")
    if cleaner == "mimic":  # whitespace runs -> " ", underscore runs -> "_" (the ends are stripped anyway)
        report = " ".join(report.split())
        report = _UNDERSCORES.sub("_", report) if "__" in report else report
    sentences = [s for s in (clean_sentence(s) for s in split_raw(report)) if s]
    return " . ".join(sentences) + " ." if sentences else ""


def report_sentences(cleaned: str) -> list[str]:
    """Sentences of a report already passed through :func:`clean_report`."""
    return [s.strip() for s in cleaned.split(" .") if s.strip()]


_DETACHED = re.compile(r"\s+([,;:!?%])")  # "clear , no" -> "clear, no"; "50 %" -> "50%"


def readable_report(cleaned: str) -> str:
    """A report in the scoring form (``the heart is normal in size . the lungs are clear .``) for people:
    each sentence capitalised, punctuation attached to the word before it, one space between sentences
    (``The heart is normal in size. The lungs are clear.``). The words are unchanged: de-identification
    tokens (``xxxx``) stay, and nothing the cleaner removed comes back."""
    out = []
    for s in report_sentences(cleaned.replace("\n", " ")):
        s = _DETACHED.sub(r"\1", s.strip(" ."))
        if s:
            out.append(s[0].upper() + s[1:] + ("" if s[-1] in "?!" else "."))
    return " ".join(out)
