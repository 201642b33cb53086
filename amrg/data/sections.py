"""Sections of a MIMIC-CXR free-text report: FINDINGS, IMPRESSION and the rest, by their headers.

Reference: MIT-LCP/mimic-cxr ``txt/section_parser.py`` (``section_text``, ``normalize_section_names``) and
``txt/create_section_files.py``. This module is our own implementation of the same rules.

Followed:

- A header is an upper-case run of ``A-Z``, space, ``( ) / , -`` ending in ``:`` plus whitespace, at the
  start of a line (MIMIC-CXR indents every line by one space). Text before the first header is the
  ``preamble``; a report without any header is one section, ``full report``.
- After a header, the search for the next one resumes at the first newline after the header's text
  start (MIT-LCP's "skip past the first newline" rule): when the header's own line is empty, so that
  ``\\s`` took its newline, the next line cannot be a header (``FINDINGS:\\n IMPRESSION: x`` is one
  FINDINGS section).
- Header names are lower-cased and normalised with MIT-LCP's table of frequent names and typos
  (``conclusion`` -> impression, ``findings and impression`` / ``findings/impression`` -> impression,
  ``impresson`` -> impression, ``finidngs`` -> findings, ``reason for exam`` -> indication, ...), then by
  containment (a name containing ``impression``, ``findings``, ``history``, ``comparison`` or
  ``addendum`` becomes it), then names describing the study (``chest``, ``pa and lateral``,
  ``portable``, ``two views``, ...) become ``findings``. ``ndication`` maps to impression as in MIT-LCP.
- Empty FINDINGS / IMPRESSION sections are dropped (a title line like ``CHEST, PA LATERAL:`` followed by
  another header); when a name occurs more than once the *last* non-empty one wins (MIT-LCP takes the
  last section of a name).
- When the report has neither FINDINGS nor IMPRESSION, the last section is cut at its first blank line
  and the rest becomes ``last_paragraph``.

Different, stated plainly:

- A header may also start the text or a line with no indentation (MIT-LCP requires ``"\\n "`` before
  it); for MIMIC-CXR's own files, which indent every line, this changes nothing.
- A blank line is any line of spaces / tabs (MIT-LCP: exactly ``"\\n \\n"``).
- Empty sections of every name are left out of the result (MIT-LCP drops only empty FINDINGS /
  IMPRESSION), and section text is returned stripped.
- :func:`findings_impression` uses FINDINGS and IMPRESSION only: ``last_paragraph`` and
  ``comparison`` (MIT-LCP's fallbacks for a report's "conclusion") are never promoted to either.
- MIT-LCP's per-study hand rules (``custom_mimic_cxr_rules``: ~30 studies with fixed character spans,
  ~20 whose conclusion sits under another header) are not applied: those reports go through the
  generic rules like any other.
"""

from __future__ import annotations

import re

_HEADER = re.compile(r"(?:^|\n)[ \t]*([A-Z][A-Z ()/,-]*):\s")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")

# normalised name -> the header spellings (lower case) that mean it (MIT-LCP's frequent names and typos)
_SYNONYMS: dict[str, tuple[str, ...]] = {
    "impression": ("impression", "conclusion", "findings and impression", "findings/impression",
                   "findings/ impression", "impresson", "imprression", "imoression", "impressoin",
                   "imprssion", "impresion", "imperssion", "mpression", "impession", "ndication"),
    "findings": ("findings", "chest, two views", "finding", "findins", "findindgs", "findgings", "findngs",
                 "findnings", "finidngs", "reference findings"),
    "comparison": ("comparison", "comparisons", "reference exam", "comparison exam", "comparison film",
                   "comparision", "comparsion", "comparrison", "comparisions"),
    "indication": ("indication", "reason for examination", "reason for exam", "clinical indication",
                   "idication"),
    "history": ("history", "clinical history", "clinical information", "patient history", "pfi"),
    "examination": ("examination", "exam", "type of examination"),
    "recommendations": ("recommendations", "recommendation(s)", "recommendation"),
    "wet read": ("wet read", "wetread"),
}
_NAME = {variant: name for name, variants in _SYNONYMS.items() for variant in variants}
_CONTAINED = ("impression", "findings", "history", "comparison", "addendum")  # checked in this order
_DESCRIBES_STUDY = re.compile(
    "chest|portable|pa and lateral|lateral and pa|ap and lateral|lateral and ap|frontal and|two views"
    "|frontal view|pa view|ap view|one view|lateral view|bone window|frontal upright"
    "|frontal semi-upright|ribs|pa and lat")
_MAIN = ("findings", "impression")


def normalize_name(header: str) -> str:
    """A header (``"FINDINGS AND IMPRESSION"``) -> its normalised section name (``"impression"``)."""
    name = header.lower().strip()
    if name in _NAME:
        return _NAME[name]
    for main in _CONTAINED:
        if main in name:
            return main
    return "findings" if _DESCRIBES_STUDY.search(name) else name


def split_sections(text: str) -> list[tuple[str, str]]:
    """The report as ``[(normalised name, raw text), ...]`` in order, before empty sections are dropped."""
    m = _HEADER.search(text)
    if m is None:
        return [("full report", text)]
    parts = [("preamble", text[:m.start(1)])]
    while m is not None:
        name, start = m.group(1), m.end()
        newline = text.find("\n", start)
        m = _HEADER.search(text, newline if newline != -1 else start)
        parts.append((normalize_name(name), text[start:m.start() if m else len(text)]))
    return parts


def sections(text: str) -> dict[str, str]:
    """Normalised section name -> stripped text (non-empty only), e.g. ``{"preamble": "FINAL REPORT",
    "indication": "...", "findings": "...", "impression": "..."}``; see the module docstring."""
    parts = [(n, t) for n, t in split_sections(text) if n not in _MAIN or t.strip()]
    if not any(n in _MAIN for n, _ in parts):
        name, last = parts[-1]
        blank = _BLANK_LINE.search(last)
        if blank is not None:
            parts[-1:] = [(name, last[:blank.start()]), ("last_paragraph", last[blank.end():])]
    out: dict[str, str] = {}
    for name, body in parts:
        if body.strip():
            out[name] = body.strip()
    return out


def findings_impression(text: str) -> tuple[str, str]:
    """``(findings, impression)`` raw text of a report, ``""`` for a section it lacks."""
    found = sections(text)
    return found.get("findings", ""), found.get("impression", "")
