"""The BN-vs-GN study: its presets (presets.py), trial records and designs (trials.py), statistics
(statistics.py), diagnostics summary (diagnostics.py), figures (figures.py), report sections (sections.py) and
rendering (render.py), the report (report.py, whose build_study is the entry point) and the cross-preset
dose-response report (dose_response.py)."""

from .presets import (BATCH_SIZES, CHANNELS_PER_GROUP, LABELS, NORMALIZATIONS, PAPER_ERROR, PRESETS,
                      REFERENCE_BATCH, bn_vs_gn_spec, groups_for, preset_spec, short_label)

# The statistics and the report (scipy, pandas, matplotlib) load when first asked for: a sweep
# imports this package for its presets, and `cnnflow run sweep --help` should wait for none of them.
_LAZY = {**dict.fromkeys(("StudyResult", "build_study"), "report"),
         **dict.fromkeys(("DELTA", "Cell", "Change", "Difference", "Estimate", "Interaction", "cell_estimates",
                          "change_verdict", "changes", "differences", "estimate", "holm", "interaction_verdict",
                          "interactions", "minimum_detectable_effect", "reference_batch", "seeds_for_mde"),
                         "statistics"),
         **dict.fromkeys(("PRECISE", "design_of"), "trials")}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_LAZY[name]}", __name__), name)


__all__ = ["BATCH_SIZES", "CHANNELS_PER_GROUP", "LABELS", "NORMALIZATIONS", "PAPER_ERROR", "PRESETS",
           "REFERENCE_BATCH", "bn_vs_gn_spec", "groups_for", "preset_spec", "short_label", *_LAZY]
