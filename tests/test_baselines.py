import numpy as np
import torch

from amrg.baselines import most_frequent_report, nearest_neighbour_reports, oracle_reports
from amrg.labels import label
from amrg.labels.schema import CHEXPERT_14

TRAIN = ["the heart is normal . the lungs are clear . no pleural effusion .",
         "the heart is normal . the lungs are clear . no pleural effusion .",
         "the heart is enlarged . the lungs are clear .",
         "small left pleural effusion . the heart is normal .",
         "there is a right pneumothorax . the heart is normal ."]


def test_most_frequent_and_nearest_neighbour():
    assert most_frequent_report(TRAIN) == TRAIN[0]
    train_f = torch.eye(5).repeat_interleave(2, 1).view(5, 2, 5)  # distinct directions per study
    test_f = train_f[[3, 2]] * 3 + 0.01
    assert nearest_neighbour_reports(train_f, TRAIN, test_f) == [TRAIN[3], TRAIN[2]]


def test_oracle_writes_the_true_findings():
    lab = np.full((3, 14), np.nan, np.float32)
    idx = {n: i for i, n in enumerate(CHEXPERT_14)}
    lab[0, idx["No Finding"]] = 1
    lab[1, idx["Cardiomegaly"]] = 1
    lab[2, idx["Pleural Effusion"]] = 1
    lab[2, idx["Pneumothorax"]] = 1
    out = oracle_reports(lab, TRAIN, label)
    assert out[0] == TRAIN[0]
    assert out[1].startswith("the heart is enlarged .") and "the heart is normal" not in out[1]
    assert "small left pleural effusion" in out[2] and "right pneumothorax" in out[2]
    assert "no pleural effusion" not in out[2]
    got = label(out)
    assert got[1, idx["Cardiomegaly"]] == 1 and got[2, idx["Pleural Effusion"]] == 1 and got[2, idx["Pneumothorax"]] == 1


def test_oracle_uncertain_as_positive_writes_the_uncertain_finding():
    lab = np.full((1, 14), np.nan, np.float32)
    lab[0, CHEXPERT_14.index("Cardiomegaly")] = -1
    assert oracle_reports(lab, TRAIN, label)[0] == TRAIN[0]  # uncertain as negative: nothing to write
    out = oracle_reports(lab, TRAIN, label, uncertain_as="positive")[0]
    assert out.startswith("the heart is enlarged .") and "the heart is normal" not in out
