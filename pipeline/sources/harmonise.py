"""Label harmonisation: each source's label names -> the model's findings.

A model finding that a source does not label is null (not labelled), never silently negative.
"""

from __future__ import annotations

# CheXpert and MIMIC-CXR (CheXpert labeller) column -> CheXNet finding. 'Lung Opacity', 'Lung Lesion',
# 'Enlarged Cardiomediastinum', 'Fracture', 'Support Devices', 'Pleural Other' have no counterpart.
CHEXPERT_TO_MODEL = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Pleural Effusion": "Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}

# PadChest's (lower-case, Spanish-radiology-derived English) labels -> CheXNet finding.
PADCHEST_TO_MODEL = {
    "atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "pleural effusion": "Effusion",
    "infiltrates": "Infiltration",
    "mass": "Mass",
    "nodule": "Nodule",
    "pneumonia": "Pneumonia",
    "pneumothorax": "Pneumothorax",
    "consolidation": "Consolidation",
    "pulmonary edema": "Edema",
    "emphysema": "Emphysema",
    "pulmonary fibrosis": "Fibrosis",
    "pleural thickening": "Pleural_Thickening",
    "hiatal hernia": "Hernia",
}

UNCERTAIN_POLICIES = ("zeros", "ones", "ignore")


def chexpert_value(v, uncertain: str) -> bool | None:
    """1 / 0 / -1 (uncertain) / blank -> True / False / policy / None."""
    s = str(v).strip()
    if s in ("1", "1.0"):
        return True
    if s in ("0", "0.0"):
        return False
    if s in ("-1", "-1.0"):
        return {"zeros": False, "ones": True, "ignore": None}[uncertain]
    return None
