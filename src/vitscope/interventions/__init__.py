"""Interventions on trained models: lesion (HDVW), skip-connection removal and localization probes (RAGHU).

Every intervention is a context manager that patches the model temporarily and restores it in
``finally``; the studies evaluate a model under each intervention and return results with ``to_rows()``.
"""
from vitscope.interventions._blocks import (
    ResidualBlock,
    SubLayer,
    get_block,
    get_sublayer,
    remove_block,
    remove_sublayer,
    residual_blocks,
    residual_sublayers,
)
from vitscope.interventions._eval import Evaluation, InterventionResult, UnitResult, evaluate
from vitscope.interventions.lesion import lesion
from vitscope.interventions.localization import (
    LocalizationLayer,
    LocalizationResult,
    fit_position_probe,
    localization_probe,
    position_classes,
)
from vitscope.interventions.skip import remove_skip, skip_removal_study

__all__ = [
    "ResidualBlock", "SubLayer", "residual_blocks", "residual_sublayers", "get_block", "get_sublayer",
    "remove_block", "remove_sublayer", "remove_skip", "lesion", "skip_removal_study", "localization_probe",
    "fit_position_probe", "position_classes", "Evaluation", "UnitResult", "InterventionResult", "LocalizationLayer",
    "LocalizationResult", "evaluate",
]
