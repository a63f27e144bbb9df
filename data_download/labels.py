"""Label tables shared by the dataset converters and the kit (one source of truth, importing nothing)."""

from __future__ import annotations

#: BTCV / Synapse multi-organ label ids, used by the synthetic cohort and the abdominal datasets.
BTCV_LABELS: dict[int, str] = {
    0: "background",
    1: "spleen",
    2: "right_kidney",
    3: "left_kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior_vena_cava",
    10: "portal_splenic_vein",
    11: "pancreas",
    12: "right_adrenal",
    13: "left_adrenal",
}
