"""The CheXNet finding order and the reference baseline prevalences (../shared/README.md)."""

from __future__ import annotations

import json
import math

CHEXNET_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)

# Baselines used by the Zech et al. reference for ln(p_subregion / p_baseline).
REFERENCE_BASELINES: dict[str, float] = {
    "Atelectasis": 0.103,
    "Cardiomegaly": 0.025,
    "Effusion": 0.119,
    "Infiltration": 0.177,
    "Mass": 0.051,
    "Nodule": 0.056,
    "Pneumonia": 0.012,
    "Pneumothorax": 0.047,
    "Consolidation": 0.042,
    "Edema": 0.021,
    "Emphysema": 0.022,
    "Fibrosis": 0.015,
    "Pleural_Thickening": 0.03,
    "Hernia": 0.002,
}


def validate_baselines(findings: tuple[str, ...], baselines: dict[str, float]) -> tuple[float, ...]:
    """Return baselines in finding order, checking each is a probability in (0, 1)."""
    from pipeline.core.errors import ConfigError

    missing = [f for f in findings if f not in baselines]
    if missing:
        raise ConfigError(
            f"no baseline prevalence for {missing}; give them in --baselines FILE "
            "(JSON or CSV finding,prevalence) or use --baselines from-labels"
        )
    out = []
    for f in findings:
        p = float(baselines[f])
        if not (0.0 < p < 1.0) or math.isnan(p):
            raise ConfigError(f"baseline for {f} is {p}; it must lie strictly between 0 and 1")
        out.append(p)
    return tuple(out)


def parse_baselines_text(text: str) -> dict[str, float]:
    """A baselines file: a JSON object {finding: p}, or CSV lines 'finding,p' (header optional)."""
    from pipeline.core.errors import ConfigError

    s = text.strip()
    if s.startswith("{"):
        return {str(k): float(v) for k, v in json.loads(s).items()}
    out: dict[str, float] = {}
    for i, line in enumerate(s.splitlines()):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2:
            raise ConfigError(f"baselines line {i + 1} is not 'finding,prevalence': {line!r}")
        try:
            out[parts[0]] = float(parts[1])
        except ValueError:
            if i == 0:
                continue  # a header row
            raise ConfigError(f"baselines line {i + 1}: {parts[1]!r} is not a number") from None
    return out
