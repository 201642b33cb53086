"""R2Gen's report cleaners (amrg.data.clean): the MIMIC-CXR variant on MIMIC-style text, expected outputs
computed by hand from the rules in the module docstring (and checked token-for-token against R2Gen's own
``clean_report_mimic_cxr`` where the docstring says they agree)."""

from __future__ import annotations

import pytest

from amrg.data.clean import clean_report, report_sentences

MIMIC_CASES = [
    # de-identification "___" disappears; "Dr. " and "a.m. " are sentence breaks for R2Gen too
    ("Dr. ___ was notified of the findings by Dr. ___ at 10:45 a.m. on ___.",
     "dr . was notified of the findings by dr . at 1045 am . on ."),
    # a numbered list over newlines; double spaces after the number
    ("1. Interval increase in small left pleural effusion.\n2. No pneumothorax.\n3.  Stable cardiomegaly.",
     "interval increase in small left pleural effusion . no pneumothorax . stable cardiomegaly ."),
    # digits and hyphens stay (R2Gen's class range is ':'..'['); the decimal point goes
    ("There is a 1.5-cm nodule in the right mid-lung, unchanged since ___. An NG-tube tip is 3 cm below the "
     "GE junction.",
     "there is a 15-cm nodule in the right mid-lung unchanged since . an ng-tube tip is 3 cm below the ge junction ."),
    # runs of dots and spaces, colon, semicolon, parentheses
    ("  Heart size is normal...  Lungs: clear;  no  focal consolidation (see prior).\n",
     "heart size is normal . lungs clear no focal consolidation see prior ."),
    # slash, percent, quotes; "___/___" is a de-identified date
    ("Comparison is made to the prior study from ___/___. O2 sat 95%. The \"hazy\" opacity at the left base, "
     "likely atelectasis.",
     "comparison is made to the prior study from . o2 sat 95 . the hazy opacity at the left base likely atelectasis ."),
    # the characters R2Gen's range removes, and the ones it does not
    ("a-b 0123456789 <x>=y? @z", "a-b 0123456789 xy z ."),
    # nothing left: "" (R2Gen: " .  .")
    ("___.\n\n ___", ""),
    # a stated difference: R2Gen deletes "1. " inside "L1. " ("body of la ct ."); here it is a sentence end
    ("Retropulsion of the posterior vertebral body of L1. A CT was ordered.",
     "retropulsion of the posterior vertebral body of l1 . a ct was ordered ."),
]


@pytest.mark.parametrize("raw,clean", MIMIC_CASES)
def test_mimic_cleaner(raw, clean):
    assert clean_report(raw, "mimic") == clean


def test_iu_and_mimic_differ_on_whitespace():
    """R2Gen's MIMIC cleaner turns newlines into spaces before splitting on ". ", its IU cleaner does not:
    a sentence break over a newline or tab is one sentence for ``iu``, two for ``mimic``."""
    raw = "The lungs are clear.\nNo effusion.\tHeart  ( normal )."
    assert clean_report(raw, "iu") == "the lungs are clear no effusion heart normal ."
    assert clean_report(raw, "mimic") == "the lungs are clear . no effusion . heart normal ."
    assert report_sentences(clean_report(raw, "mimic")) == ["the lungs are clear", "no effusion", "heart normal"]
    same = "Heart normal. 1. Lungs clear. 2. No XXXX effusion."  # no newline: both cleaners agree
    assert clean_report(same, "iu") == clean_report(same, "mimic") == "heart normal . lungs clear . no xxxx effusion ."


def test_cleaner_argument_checked():
    with pytest.raises(ValueError, match="unknown report cleaner"):
        clean_report("x", "chexpert")
    with pytest.raises(TypeError, match="string"):
        clean_report(None, "mimic")


@pytest.mark.parametrize("cleaned, readable", [
    ("the heart is normal in size . the lungs are clear .", "The heart is normal in size. The lungs are clear."),
    ("no pneumothorax , effusion or focal consolidation .", "No pneumothorax, effusion or focal consolidation."),
    ("xxxx opacity in the right base ; likely atelectasis .", "Xxxx opacity in the right base; likely atelectasis."),
    ("t-spine degenerative changes . 2 cm nodule", "T-spine degenerative changes. 2 cm nodule."),
    ("is there a pneumothorax ?", "Is there a pneumothorax?"),
    ("", ""),
    (" . . ", ""),
])
def test_readable_report_capitalises_and_attaches_punctuation(cleaned, readable):
    from amrg.data.clean import readable_report

    assert readable_report(cleaned) == readable


def test_readable_report_keeps_every_word_of_a_cleaned_report():
    from amrg.data.clean import clean_report, readable_report

    raw = "The heart is normal in size. The lungs are clear, no effusion. 1. No pneumothorax."
    cleaned = clean_report(raw, "iu")
    assert readable_report(cleaned).lower().replace(".", " .").replace(",", " ,").split() == cleaned.split()
