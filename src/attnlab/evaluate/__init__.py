"""How faithful are explanations, and what do heads do.

* :mod:`~attnlab.evaluate.faithfulness` — deletion / insertion curves, maskers (constant, ROAD), random baseline;
* :mod:`~attnlab.evaluate.uncertainty` — bootstrap intervals over samples, paired test against a baseline;
* :mod:`~attnlab.evaluate.sanity` — the model-parameter randomisation test (does a map depend on the weights?);
* :mod:`~attnlab.evaluate.groundtruth` — AUROC and pointing game against planted evidence;
* :mod:`~attnlab.evaluate.heads` — head diagnostics (entropy, sink, locality), head ablation;
* :mod:`~attnlab.evaluate.baselines` — input×gradient and integrated gradients per item (captum).
"""
from attnlab.evaluate.baselines import attributions_to_items, input_x_gradient, integrated_gradients
from attnlab.evaluate.faithfulness import (Curve, Masker, deletion_curve, insertion_curve,
                                           patch_masker, random_importance, road_like, road_masker,
                                           sequence_masker, stream_masker)
from attnlab.evaluate.groundtruth import AurocResult, evidence_auroc, pointing_game, pointing_hits
from attnlab.evaluate.heads import (HeadImportance, HeadStats, ablate_heads, head_diagnostics,
                                    head_importance)
from attnlab.evaluate.sanity import randomisation_blocks, rank_correlations, sanity_check
from attnlab.evaluate.uncertainty import bootstrap_ci, paired_test, uncertainty

__all__ = [
    "AurocResult", "Curve", "HeadImportance", "HeadStats", "Masker",
    "ablate_heads", "attributions_to_items", "bootstrap_ci", "deletion_curve", "evidence_auroc",
    "head_diagnostics", "head_importance", "input_x_gradient", "insertion_curve",
    "integrated_gradients", "paired_test", "patch_masker", "pointing_game", "pointing_hits",
    "random_importance", "randomisation_blocks", "rank_correlations", "road_like", "road_masker",
    "sanity_check", "sequence_masker", "stream_masker", "uncertainty",
]
