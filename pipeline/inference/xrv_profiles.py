"""What torchxrayvision's models expect besides their weights, copied from torchxrayvision 1.5.x
(``xrv.models.model_urls``; tests/inference/test_xrv.py checks the copy against the installed package): each
model's 18 output names ('' where it was not trained on that finding), its operating-point
calibration (``op_threshs``, NaN where it has none) and its input size.

Torch-free and torchxrayvision-free: ``--arch xrv:...`` is validated, and a run's findings are
mapped onto the model's outputs, before either is imported.
"""

from __future__ import annotations

import math

NAN = math.nan

_ALL = ("Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis", "Effusion",
        "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion", "Fracture",
        "Lung Opacity", "Enlarged Cardiomediastinum")
_CHEX = ("Atelectasis", "Consolidation", "", "Pneumothorax", "Edema", "", "", "Effusion", "Pneumonia", "", "Cardiomegaly",
         "", "", "", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum")

# weights name -> (output names, op_threshs, input size)
XRV_MODELS: dict[str, tuple[tuple[str, ...], tuple[float, ...], int]] = {
    "densenet121-res224-all": (_ALL, (
        0.07422872, 0.038290843, 0.09814756, 0.0098118475, 0.023601074, 0.0022490358, 0.010060724, 0.103246614,
        0.056810737, 0.026791653, 0.050318155, 0.023985857, 0.01939503, 0.042889766, 0.053369623, 0.035975814,
        0.20204692, 0.05015312), 224),
    "densenet121-res224-nih": (_ALL[:14] + ("", "", "", ""), (
        0.039117552, 0.0034529066, 0.11396341, 0.0057298196, 0.00045666535, 0.0018880932, 0.012037827, 0.038744126,
        0.0037213727, 0.014730946, 0.016149804, 0.054241467, 0.037198864, 0.0004403434, NAN, NAN, NAN, NAN), 224),
    "densenet121-res224-pc": (_ALL[:14] + ("", "Fracture", "", ""), (
        0.031012505, 0.013347598, 0.081435576, 0.001262615, 0.002587246, 0.0035944257, 0.0023071, 0.055412333,
        0.044385884, 0.042766232, 0.043258056, 0.037629247, 0.005658899, 0.0091741895, NAN, 0.026507627, NAN, NAN), 224),
    "densenet121-res224-chex": (_CHEX, (
        0.1988969, 0.05710573, NAN, 0.0531293, 0.1435217, NAN, NAN, 0.27212676, 0.07749717, NAN, 0.19712369, NAN, NAN,
        NAN, 0.09932402, 0.09273402, 0.3270967, 0.10888247), 224),
    "densenet121-res224-rsna": (("",) * 8 + ("Pneumonia",) + ("",) * 7 + ("Lung Opacity", ""), (
        NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN, 0.13486601, NAN, NAN, NAN, NAN, NAN, NAN, NAN, 0.13511065, NAN), 224),
    "densenet121-res224-mimic_nb": (_CHEX, (
        0.08558747, 0.011884617, NAN, 0.0040595434, 0.010733786, NAN, NAN, 0.118761964, 0.022924708, NAN, 0.06358637,
        NAN, NAN, NAN, 0.022143636, 0.017476924, 0.1258702, 0.014020768), 224),
    "densenet121-res224-mimic_ch": (_CHEX, (
        0.09121389, 0.010573786, NAN, 0.005023008, 0.003698257, NAN, NAN, 0.08001232, 0.037242252, NAN, 0.05006329,
        NAN, NAN, NAN, 0.019866971, 0.03823637, 0.11303808, 0.0069147074), 224),
    "resnet50-res512-all": (_ALL, (
        0.51570356, 0.50444704, 0.53787947, 0.50723547, 0.5025118, 0.5035252, 0.5038076, 0.51862943, 0.5078151,
        0.50724894, 0.5056339, 0.510706, 0.5053923, 0.5020846, NAN, 0.5080557, 0.5138526, NAN), 512),
}

# A model's output name -> the job's finding name (NIH ChestX-ray14 spelling, as CHEXNET_FINDINGS).
# torchxrayvision already uses NIH's spelling for the NIH findings; other sources' spellings are mapped
# too, so that a model whose targets say 'Infiltrate' or 'Pleural Thickening' reports Infiltration.
FINDING_SYNONYMS: dict[str, str] = {
    "Infiltrate": "Infiltration",
    "Infiltrates": "Infiltration",
    "Pleural Thickening": "Pleural_Thickening",
    "Pleural_Thickening": "Pleural_Thickening",
    "Pleural Effusion": "Effusion",
    "Pleural_Effusion": "Effusion",
    "Enlarged Cardiac Silhouette": "Cardiomegaly",
}


def job_finding(target: str) -> str:
    """The job's name for a model output name ('' stays '': an unused output)."""
    return FINDING_SYNONYMS.get(target, target)
