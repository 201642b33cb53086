"""Rule-based CheXpert-14 labeler (regular expressions, in the spirit of the Stanford CheXpert labeler).

Output: ``label_reports(reports) -> float32 (N, 14)`` in ``CHEXPERT_14`` order with 1 positive,
0 negative, -1 uncertain, NaN not mentioned. An empty report (no sentence after splitting, e.g. ``""``,
``"  "``, ``"..."``) gives an all-NaN row; :func:`count_empty` counts them with the same definition.

Pipeline and conventions
------------------------
1. :func:`split_sentences` (public, also used to build sentence banks): boundaries are ``. ! ?``
   followed by white space or the end, and blank lines; a period after an abbreviation (``e.g.``,
   ``i.e.``, ``approx.``, ``vs.``, ``dr.``, a single letter, ...) is not a boundary; decimals (``2.5 cm``)
   never split (no space after the dot) but a missing space between words does ("contour.Unfolded");
   list numbers (``1.``, ``2)``) and section headers (``FINDINGS:``) at the start of a sentence are
   dropped; ``<BR>`` becomes a space; ``XXXX`` tokens are kept as words.
2. Each unique sentence is labelled once (``lru_cache``): lower-cased, cut into clauses at ``;`` ``:``
   and contrast words (but, however, although, except, other than, ...). Negation and uncertainty never
   cross a clause boundary.
3. Mentions, per observation: fixed phrases (``_DIRECT``) and subject + attribute pairs (``_SUBJECTS``:
   "heart size is normal" -> Cardiomegaly 0, "enlarged cardiac silhouette" -> 1, "heart size is upper
   limits of normal" / "borderline" / "prominent" -> -1; the subject alone, e.g. "heart size is stable",
   is no mention). ``XXXX`` is an ordinary word, so "No XXXX of pleural effusion" is negated.
4. Polarity of a mention, first rule that fires:
   a. negated uncertainty ("cannot exclude", "cannot be excluded", "not ruled out", "rule out") -> -1;
   b. negation: a trigger before it in the clause (no, not, without, free of, negative for, clear of,
      absence of, resolution of, neither/nor, ...; "no change/increase in" is *not* a negation) at most
      12 words before it with no scope breaker in between (which, there is, "is seen/noted", may, might,
      could, likely, possibly, "and a ..."), or a predicate after it ("is not seen" -- but not "not
      seen on prior" --, "has resolved", "is absent", "removed") -> 0; so "no focal airspace
      consolidation, pleural effusion or pneumothorax" negates all three. Commas are not needed
      (R2Gen-cleaned text has none);
   c. uncertainty: a trigger before it (possible, probable, likely, may, might, could, questionable,
      suspicious, suspect, concern for, suggest, versus/vs, consider, differential, indeterminate,
      equivocal, presumed, borderline) or a predicate after it ("is possible/likely/suspected",
      "may be present", "versus") -> -1. CheXpert treats "likely" as uncertain; so do we;
   d. otherwise -> 1.
   Negation is checked before uncertainty ("no suspicious nodule" -> 0, "no opacity to suggest
   pneumonia" -> 0) but a hedge word breaks the negation scope ("no pneumonia, may represent
   atelectasis" -> Pneumonia 0, Atelectasis -1).
5. Aggregation over a report's sentences, per observation: positive > uncertain > negative > NaN.
6. No Finding = 1 when no observation other than Support Devices and No Finding is positive or
   uncertain *and* no "other finding" outside the 14 (``_OTHER``: granuloma, calcification,
   degenerative change, scoliosis, emphysema, hyperinflation, hernia, elevation, ...) is positive or
   uncertain -- the CheXpert convention, whose No-Finding phrase list plays the same role. Otherwise
   NaN (never 0).

Observation choices (documented deviations / decisions)
-------------------------------------------------------
* Lung Lesion: nodule, mass, tumour, neoplasm, carcinoma, malignancy, metastasis, lump, lesion (not
  bony / lytic / skin). **Granulomas and calcified nodules are not Lung Lesion** (as in CheXpert, whose
  lesion list lacks "granuloma" and un-mentions "calcified nodule"): they are benign healed findings and
  count as "other findings", i.e. they only prevent No Finding = 1.
* "airspace disease/process" -> Lung Opacity *and* Consolidation; opacity, infiltrate, density (not bone
  or breast), haziness, scar(ring) (not pleural), reticular, ground glass, fibrosis -> Lung Opacity.
* "prominent" / "prominence" of heart, mediastinum, vascularity or interstitial markings -> -1 for
  Cardiomegaly / Enlarged Cardiomediastinum / Edema / Lung Opacity; "interstitial prominence" -> Edema
  -1; CHF / heart failure -> Edema (by its polarity) and Cardiomegaly -1 when affirmed or uncertain
  (CheXpert rule).
* "the lungs are clear" labels nothing (it only leaves No Finding free to be 1).
* blunting / blunted (costophrenic angle) -> Pleural Effusion; "costophrenic angles are sharp" -> 0;
  "pericardial effusion" is not a pleural effusion.
* Pleural Other: pleural thickening / scar / plaque / calcification, fibrothorax, apical cap.
* Fracture: fracture(s), fx, rib deformity. Old or healed fractures are positive.
* Support Devices: tubes, lines, catheters, PICC, pacemaker / leads / AICD, sternotomy (wires), clips,
  stents, ports, prostheses, hardware, drains, devices; "removed" negates.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Sequence

import numpy as np

from .schema import CHEXPERT_14, N_LABELS

_I = {name: i for i, name in enumerate(CHEXPERT_14)}
_OTHER = N_LABELS  # internal column: findings outside the 14; they only block No Finding
_NCOL = N_LABELS + 1
_NF, _SD = _I["No Finding"], _I["Support Devices"]
_FINDING_COLS = [i for i in range(_NCOL) if i not in (_NF, _SD)]
_RANK = {0: 1, -1: 2, 1: 3}  # NaN = 0; aggregation takes the max rank
_FROM_RANK = (math.nan, 0.0, -1.0, 1.0)


def _rx(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.IGNORECASE)


# ----------------------------------------------------------------------------- sentence splitting
_END = re.compile(r"[.!?]+(?=\s|$)|(?<=[a-z]{2})\.(?=[A-Z][a-z])|\n[ \t]*\n")  # "contour.Unfolded" splits
_ABBREV = _rx(r"(?:^|[\s(])(?:e\.g|i\.e|approx|appr|vs|dr|mr|mrs|ms|st|fig|cf|ca|resp|incl|esp|pt|a\.m|p\.m|[a-z])$")
_ENUM_ONLY = re.compile(r"^\s*\(?\d{1,2}[.)]?\s*$")
_LEAD = _rx(r"^(?:\(?\d{1,2}[.)]\s+|[-*\u2022]\s+|(?:findings|impression|conclusions?|comparison|indications?"
            r"|history|technique|examination|exam|clinical history|reason for exam)\s*:\s*)+")
_WS = re.compile(r"\s+")
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_HAS_WORD = re.compile(r"[A-Za-z0-9]")


def split_sentences(text: str) -> list[str]:
    """Split a report into sentences (white space collapsed, list numbers / headers dropped)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    text = _BR.sub(" ", text)
    out: list[str] = []
    start, carry = 0, ""
    for m in _END.finditer(text):
        if m.group() == "." and _ABBREV.search(text, start, m.start()):
            continue  # "e.g." / "approx." / initials: not a boundary
        piece, start = text[start:m.end()], m.end()
        if _ENUM_ONLY.match(piece):  # a bare "1." belongs to the next sentence
            carry += piece
            continue
        _emit(carry + piece, out)
        carry = ""
    _emit(carry + text[start:], out)
    return out


def _emit(piece: str, out: list[str]) -> None:
    s = _LEAD.sub("", _WS.sub(" ", piece).strip())
    if _HAS_WORD.search(s):
        out.append(s)


def count_empty(reports: Sequence[str]) -> int:
    """Number of reports that give an all-NaN row (no sentence after :func:`split_sentences`)."""
    return sum(1 for r in _check(reports) if not split_sentences(r))


# ----------------------------------------------------------------------------- mention phrases
_DIRECT: dict[str, list[str]] = {  # observation -> alternatives; polarity from context
    "Cardiomegaly": [r"\bcardiomegal\w*", r"\bcardiac enlargement"],
    "Lung Lesion": [r"\bnodules?\b", r"\bnodular (?:opaci\w+|densit\w+|lesions?)",
                    r"(?<!soft tissue )\bmass(?:es)?\b", r"\btumou?rs?\b", r"\bneoplas\w*", r"\bcarcinoma\w*",
                    r"\bmalignan\w*", r"\bmetasta\w*", r"\blumps?\b",
                    r"(?<!lytic )(?<!bony )(?<!bone )(?<!osseous )(?<!skin )(?<!sclerotic )\blesions?\b"],
    "Lung Opacity": [r"\bopaci\w*", r"\binfiltra\w*", r"(?<!bone )(?<!bony )(?<!breast )\bdensit(?:y|ies)\b",
                     r"\bhaz(?:y|iness)\b", r"(?<!pleural )(?<!parenchymal )\bscar(?:s|ring|red)?\b",
                     r"\bair[- ]?space (?:disease|process)", r"\breticul\w*", r"\bground[- ]glass",
                     r"\bfibro(?:sis|tic)\b"],
    "Edema": [r"(?<!soft tissue )\b(?:o)?edema\w*", r"\bvascular congestion", r"\bpulmonary congestion",
              r"\bchf\b", r"\bheart failure", r"\bfluid overload", r"\bkerley\b", r"\bseptal lines",
              r"\bcephali[sz]ation"],
    "Consolidation": [r"\bconsolidat\w*", r"\bair[- ]?space (?:disease|process)"],
    "Pneumonia": [r"\b(?:broncho)?pneumon(?:ia|ias|ic|itis)\b",
                  r"(?<!granulomatous )(?<!tuberculosis )(?<!histoplasmosis )(?<!osseous )\binfect\w*"],
    "Atelectasis": [r"\batelecta\w*", r"\bvolume loss",
                    r"(?<!vertebral )(?<!vertebra )(?<!body )(?<!compression )\bcollaps\w*"],
    "Pneumothorax": [r"\b(?:hydro)?pneumothora\w*", r"\bpleural air\b"],
    "Pleural Effusion": [r"(?<!pericardial )\beffusions?\b", r"\bpleural fluid", r"\bhydro(?:pneumo)?thora\w*",
                         r"\bblunt(?:ing|ed)\b", r"\bfluid (?:in|within|along) the (?:\w+ )?fissure"],
    "Pleural Other": [r"\bpleural (?:effusions? (?:or|and) )?(?:thickening|scar\w*|plaques?|calcif\w*)",
                      r"\bpleural[- ]?parenchymal (?:scar\w*|thickening|fibrosis)", r"\bpleuroparenchymal \w+",
                      r"\bfibrothorax", r"\bapical (?:pleural )?(?:cap|capping|thickening)\b"],
    "Fracture": [r"\bfractur\w*", r"\bfx\b", r"\brib deformit\w*", r"\bdeformit(?:y|ies) of (?:the )?(?:\w+ )?ribs?"],
    "Support Devices": [
        r"\b(?:tubes?|tubing)\b", r"\b(?:picc|central(?: venous)?|venous|arterial|swan[- ]ganz|ij|jugular"
        r"|subclavian|dialysis|midline) (?:lines?|catheters?)\b", r"\bpicc\b", r"\bcatheters?\b",
        r"\bpace(?:makers?|rs?)\b", r"\ba?icd\b", r"\bdefibrillat\w*", r"\bleads\b", r"\bwires?\b",
        r"\bsternotomy\b", r"\bcerclage", r"\b(?:surgical )?(?:clips?|staples)\b", r"\bstents?\b",
        r"\bport(?:-a-cath)?\b", r"\bportacath", r"\bprosthe\w+", r"\bhardware\b", r"\bdevices?\b",
        r"\bdrains?\b", r"\bpigtail", r"\blvad\b", r"\biabp\b", r"\bballoon pump", r"\belectrodes?\b"],
    "_other": [r"\bemphysema\w*", r"\bcopd\b", r"\bhyper(?:infla|expan|aera|lucen)\w*", r"\bgranulom\w*",
               r"\bcalcifi\w*", r"\bdegenerat\w*", r"\bspondylo\w*", r"\bosteophyt\w*", r"\w*scolio\w*",
               r"\bkypho\w*", r"\belevat\w*", r"\beventration", r"\bhernia\w*", r"\bbull(?:a|ae|ous)\b",
               r"\bblebs?\b", r"\bbronchiectasis", r"\bthicken\w*", r"\bprominen\w*", r"\btortu\w*",
               r"\bectatic", r"\baneurys\w*", r"\batheroscl\w*", r"\bosteopeni\w*", r"\bdeformit\w*",
               r"\bpneumo(?:mediastinum|peritoneum)", r"\b(?:lymph)?adenopath\w*", r"\bcysts?\b", r"\bcavit\w*",
               r"\blucenc\w*", r"\bbronchi(?:tis|olitis)\b", r"\basthma", r"\baspiration", r"\bhemorrhag\w*",
               r"\bhematoma", r"\bcontusion", r"\bcuffing", r"\barthr(?:itis|itic|opathy)"],
}
_CAPPED: dict[str, list[str]] = {  # contribute -1 when affirmed or uncertain, nothing when negated
    "Cardiomegaly": [r"\bchf\b", r"\bheart failure"],
    "Edema": [r"\binterstitial prominence", r"\bprominent interstiti\w*"],
}
_NORMAL = r"normal(?:ly)?\b|within (?:the )?normal (?:limits|range)|\bwnl\b|unremarkable|negative\b"
_BORDER = (r"borderline(?: \w+)?|(?:upper|high|top)(?:-| )(?:limits? of |range of |end of )?normal"
           r"|at the upper limits?|prominen\w*")
_SIZE = r"enlarg\w*|large(?:r)?\b|increased|dilat\w*|big\b"
_SUBJECTS: list[tuple[str, str, str, str, str]] = [  # observation, subject, abnormal, borderline, normal
    ("Cardiomegaly", r"\b(?:heart|cardiac)(?: (?:size|silhouette|shadow|contours?|borders?|diameter))?\b",
     _SIZE, _BORDER, _NORMAL),
    ("Enlarged Cardiomediastinum", r"\b(?:cardio[ -]?)?mediastinum\b|\b(?:cardio[ -]?)?mediastinal (?:silhouettes?"
     r"|contours?|width|shadows?|structures|configuration|size|borders?)\b|\bmediastinal(?= (?:widening|enlargement"
     r"|prominence)\b)", _SIZE + r"|widen\w*|wide\b", _BORDER, _NORMAL),
    ("Pleural Effusion", r"\b(?:costophrenic|cp)(?: (?:angles?|recess(?:es)?|sulc[iu]s?))?\b|\bpleural spaces?\b",
     r"blunt\w*|obliterat\w*|fluid", r"$^", _NORMAL + r"|sharp\w*|\bclear\b|preserved"),
    ("Edema", r"\b(?:pulmonary )?(?:vascularity|vasculature|vascular (?:markings|pattern)|vessels)\b",
     r"congest\w*|engorg\w*|indistinct\w*|cephali[sz]\w*|redistribut\w*|increased|enlarg\w*", _BORDER, _NORMAL),
    ("Lung Opacity", r"\b(?:interstitial|lung|bronchovascular|pulmonary) markings\b|\binterstitium\b",
     r"increas\w*|coarse\w*|accentuat\w*|thicken\w*", _BORDER, _NORMAL),
]

_COL = {name: (_OTHER if name == "_other" else _I[name]) for name in _DIRECT}
_UNMENTION = {"Lung Lesion": r"\bcalcifi\w*(?: [\w-]+){0,3} $"}  # text just before a mention that cancels it
_NEVER = re.compile(r"(?!x)x")
_DIRECT_RX = [(_COL[k], _rx("|".join(v)), _rx(_UNMENTION[k]) if k in _UNMENTION else _NEVER)
              for k, v in _DIRECT.items()]
_CAPPED_RX = [(_I[k], _rx("|".join(v))) for k, v in _CAPPED.items()]


def _attr_rx(abn: str, border: str, normal: str) -> tuple[re.Pattern, re.Pattern]:
    attr = rf"(?P<b>\b(?:{border}))|(?P<n>\b(?:{normal}))|(?P<x>\b(?:{abn}))"
    before = _rx(rf"(?:{attr})(?: (?!and\b|or\b|is\b|are\b|was\b|were\b)[\w-]+){{0,3}} $")
    return _rx(attr), before


_SUBJECT_RX = [(_I[o], _rx(s), *_attr_rx(a, b, n)) for o, s, a, b, n in _SUBJECTS]

# ----------------------------------------------------------------------------- negation / uncertainty
_CLAUSE = _rx(r";|:|\b(?:but|however|although|though|whereas|except|aside from|apart from|other than"
              r"|with the exception of|nevertheless)\b")
_WINDOW_STOP = _rx(r"\b(?:with|which|while|there|secondary|due|related|consistent|compatible|suggest\w*|most|from)\b")
_SOFT = _rx(r"\b(?:which|who|whose|there (?:is|are|was|were)|(?:is|are|was|were) (?:again )?(?:seen|noted|identified"
            r"|present|demonstrated|visualized|appreciated|evident)|may|might|could|likely|possibly|probably"
            r"|and (?:a|an|the|new)|with (?:a|an|new|mild|small|moderate|large))\b")
_STRONG_UNC = _rx(r"\b(?:can ?not|cant|can't|could not|not) (?:be )?(?:entirely |completely |totally |definitely )?"
                  r"(?:exclude[ds]?|rule[ds]? out)\b|\b(?:difficult|hard) to (?:exclude|rule out)|\brule out\b|\br/o\b")
_STRONG_UNC_POST = _rx(r"^.{0,40}?\b(?:(?:can ?not|cant|can't|could not|not) (?:\w+ )?(?:be )?(?:\w+ )?"
                       r"(?:excluded|ruled out)|difficult to exclude)")
_SEEN = (r"(?:seen|identified|visuali[sz]ed|visible|present|demonstrated|evident|appreciated|noted|detected|apparent"
         r"|excluded|ruled)\b")
_NEG = _rx(r"\b(?:no|without|free of|negative for|clear of|absence of|absent|resolution of|resolved|neither|nor"
           r"|rather than|lack of|removal of|clearing of|never|none)\b|n't\b|\bnot\b(?! (?:\w+ )?" + _SEEN + ")")
_NO_CHANGE = _rx(r" (?:(?:significant|interval|appreciable|substantial|further|definite) )*"
                 r"(?:change|increase|decrease|worsening|improvement|progression|growth)")
_NEG_POST = _rx(r"^.{0,40}?\b(?:not (?:\w+ )?" + _SEEN + r"(?! (?:on|in) (?:the )?(?:prior|previous|earlier"
                r"|comparison))|(?:has|have) (?:since |now )?(?:resolved|cleared)|resolved"
                r"|(?:is|are|was|were|now) absent|excluded|ruled out|(?:has|have) been removed|removed"
                r"|no longer (?:\w+ )?(?:seen|present|visuali[sz]ed|evident|identified|visible))\b")
_UNC = _rx(r"\b(?:possibl[ey]|probabl[ey]|likely|may|might|could|questionabl[ey]|question of|questioned|suspicious"
           r"|suspect(?:ed)?|concern(?:ing)?(?: for)?|suggest\w*|versus|vs|differential|consider(?:ed|ation)?"
           r"|indeterminate|equivocal|presum\w*|perhaps|uncertain|borderline|worrisome|potential|evaluat\w* (?:for|of)"
           r"|assess\w* for|correlate clinically|clinical correlation)\b")
_UNC_POST = _rx(r"^.{0,40}?\b(?:(?:is|are|was|were|be|appears?) (?:also |more |most |felt to be |thought to be )?"
                r"(?:possible|possibly|probable|probably|likely|suspected|questioned|questionable|favou?red|considered"
                r"|a consideration|uncertain)|(?:may|might|could) (?:also )?(?:be (?:present|seen|noted|developing"
                r"|possible|considered)|exist)|versus|vs)\b")
_MAXPRE, _MAXWORDS = 160, 12  # scope of a trigger before a mention: characters, words


def _last_in_scope(rx: re.Pattern, pre: str) -> re.Match | None:
    last = None
    for last in rx.finditer(pre):
        pass
    if last is None or _SOFT.search(pre, last.end()) or pre.count(" ", last.end()) > _MAXWORDS:
        return None
    return last


def _polarity(pre: str, inner: str, post: str) -> int:
    pre = pre[-_MAXPRE:]
    if _last_in_scope(_STRONG_UNC, pre) or _STRONG_UNC_POST.search(post):
        return -1
    neg = _last_in_scope(_NEG, pre)
    if neg is not None and neg.group() in ("no", "without") and _NO_CHANGE.match(pre, neg.end()):
        neg = None  # "no change in the effusion" asserts the effusion
    if neg is not None or _NEG_POST.search(post) or _NEG.search(inner):
        return 0
    if _last_in_scope(_UNC, pre) or _UNC_POST.search(post) or _UNC.search(inner):
        return -1
    return 1


def _clauses(sentence: str) -> list[str]:
    text = _WS.sub(" ", sentence.lower()).strip()
    return [c.strip() for c in _CLAUSE.split(text) if c.strip()]


@lru_cache(maxsize=1 << 19)
def _sentence_ranks(sentence: str) -> tuple[int, ...]:
    ranks = [0] * _NCOL

    def put(col: int, value: int) -> None:
        ranks[col] = max(ranks[col], _RANK[value])

    for clause in _clauses(sentence):
        for col, rx, unmention in _DIRECT_RX:
            for m in rx.finditer(clause):
                if not unmention.search(clause, max(0, m.start() - 40), m.start()):
                    put(col, _polarity(clause[:m.start()], "", clause[m.end():]))
        for col, rx in _CAPPED_RX:
            for m in rx.finditer(clause):
                if _polarity(clause[:m.start()], "", clause[m.end():]) != 0:
                    put(col, -1)
        for col, subj, attr, before in _SUBJECT_RX:
            for m in subj.finditer(clause):
                pre, window = clause[:m.start()], clause[m.end():m.end() + 70]
                b = before.search(pre[-60:])
                if b is not None:  # "enlarged heart", "normal heart size", "blunting of the right costophrenic"
                    kind, pre, inner, post = b.lastgroup, pre[:len(pre) - len(b.group())], "", clause[m.end():]
                else:  # "heart size is normal", "the heart is not enlarged"
                    stop = _WINDOW_STOP.search(window)
                    a = attr.search(window[:stop.start()] if stop else window)
                    if a is None:
                        continue
                    kind, inner, post = a.lastgroup, window[:a.start()], clause[m.end() + a.end():]
                if kind == "n":
                    put(col, 0)
                else:
                    p = _polarity(pre, inner, post)
                    put(col, p if kind == "x" or p == 0 else -1)
    return tuple(ranks)


# ----------------------------------------------------------------------------- reports
def _check(reports: Sequence[str]) -> list[str]:
    if isinstance(reports, (str, bytes)):
        raise TypeError("reports must be a sequence of strings, got a single " + type(reports).__name__)
    reports = list(reports)
    for i, r in enumerate(reports):
        if not isinstance(r, str):
            raise TypeError(f"reports[{i}] must be a string, got {type(r).__name__}")
    return reports


@lru_cache(maxsize=1 << 16)
def _report_row(report: str) -> tuple[float, ...]:
    sentences = split_sentences(report)
    if not sentences:
        return (math.nan,) * N_LABELS
    ranks = [0] * _NCOL
    for s in sentences:
        ranks = [max(a, b) for a, b in zip(ranks, _sentence_ranks(s))]
    if not any(ranks[c] >= 2 for c in _FINDING_COLS):
        ranks[_NF] = 3  # No Finding: nothing but support devices is positive or uncertain
    return tuple(_FROM_RANK[r] for r in ranks[:N_LABELS])


def label_reports(reports: Sequence[str]) -> np.ndarray:
    """Label reports; returns float32 ``(N, 14)`` in ``CHEXPERT_14`` order (1 / 0 / -1 / NaN)."""
    from ..io import progress  # torch-heavy module: imported when labelling, not with amrg.labels

    reports = _check(reports)
    out = np.empty((len(reports), N_LABELS), dtype=np.float32)
    for i, r in enumerate(progress(reports, "label reports (rules)", unit="reports")):
        out[i] = _report_row(r)
    return out
