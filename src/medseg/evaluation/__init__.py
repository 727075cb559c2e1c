"""Evaluation: the metrics (DSC, HD95, NSD), the one scoring loop, the evaluate stage, cross-validation folds,
the statistics of a comparison, and how slices are shown in overlays."""
