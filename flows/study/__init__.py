"""The BN-vs-GN study: its presets (presets.py), its statistics (statistics.py), its diagnostics summary
(diagnostics.py), figures (figures.py) and report (report.py, whose build_study is the entry point)."""

from .presets import (BATCH_SIZES, CHANNELS_PER_GROUP, LABELS, NORMALIZATIONS, PAPER_ERROR, PRESETS,
                      REFERENCE_BATCH, bn_vs_gn_spec, groups_for, preset_spec, short_label)
from .report import StudyResult, build_study
from .statistics import (DELTA, Cell, Change, Estimate, Interaction, cell_estimates, change_verdict, changes,
                         estimate, interaction_verdict, interactions, minimum_detectable_effect, reference_batch)

__all__ = ["BATCH_SIZES", "CHANNELS_PER_GROUP", "LABELS", "NORMALIZATIONS", "PAPER_ERROR", "PRESETS",
           "REFERENCE_BATCH", "bn_vs_gn_spec", "groups_for", "preset_spec", "short_label", "StudyResult",
           "build_study", "DELTA", "Cell", "Change", "Estimate", "Interaction", "cell_estimates", "change_verdict",
           "changes", "estimate", "interaction_verdict", "interactions", "minimum_detectable_effect",
           "reference_batch"]
