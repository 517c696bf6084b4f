"""How faithful are explanations, and what do heads do.

* :mod:`~attnlab.evaluate.faithfulness` — deletion / insertion curves, maskers, random baseline;
* :mod:`~attnlab.evaluate.groundtruth` — AUROC and pointing game against planted evidence;
* :mod:`~attnlab.evaluate.heads` — head diagnostics (entropy, sink, locality), head ablation;
* :mod:`~attnlab.evaluate.baselines` — input×gradient and integrated gradients per item (captum).
"""
from attnlab.evaluate.baselines import attributions_to_items, input_x_gradient, integrated_gradients
from attnlab.evaluate.faithfulness import (Curve, Masker, deletion_curve, insertion_curve,
                                           patch_masker, random_importance, sequence_masker,
                                           stream_masker)
from attnlab.evaluate.groundtruth import AurocResult, evidence_auroc, pointing_game
from attnlab.evaluate.heads import (HeadImportance, HeadStats, ablate_heads, head_diagnostics,
                                    head_importance)

__all__ = [
    "AurocResult", "Curve", "HeadImportance", "HeadStats", "Masker",
    "ablate_heads", "attributions_to_items", "deletion_curve", "evidence_auroc",
    "head_diagnostics", "head_importance", "input_x_gradient", "insertion_curve",
    "integrated_gradients", "patch_masker", "pointing_game", "random_importance",
    "sequence_masker", "stream_masker",
]
