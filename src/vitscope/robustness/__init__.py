"""Robustness and calibration of ViTs and CNNs: calibration metrics (HDVW; the streaming measure lives in
``vitscope.measures.calibration`` and is re-exported here), center occlusion and FGSM (CB), PGD, Fourier-band
noise (HDVW) and common corruptions (ImageNet-C / CIFAR-C)."""
from vitscope.measures.calibration import Calibration, calibration
from vitscope.robustness.attacks import Normalized, fgsm, pgd, pixel_model, resolve_normalization
from vitscope.robustness.corruptions import (
    CIFAR_C_NAMES,
    CORRUPTIONS,
    CIFARCDataset,
    corrupt,
    corruption_params,
    load_cifar_c,
)
from vitscope.robustness.frequency import band_mask, band_noise, frequency_noise, frequency_radius, frequency_sweep
from vitscope.robustness.occlusion import occlude_center, occlusion_box
from vitscope.robustness.report import figures, result_tables, save_results
from vitscope.robustness.suite import DEFAULT_EPS, DEFAULT_FREQS, SUITE, evaluate_cifar_c, evaluate_robustness

__all__ = [
    "Calibration", "calibration",
    "Normalized", "fgsm", "pgd", "pixel_model", "resolve_normalization",
    "occlude_center", "occlusion_box",
    "band_mask", "band_noise", "frequency_noise", "frequency_radius", "frequency_sweep",
    "CORRUPTIONS", "CIFAR_C_NAMES", "CIFARCDataset", "corrupt", "corruption_params", "load_cifar_c",
    "SUITE", "DEFAULT_EPS", "DEFAULT_FREQS", "evaluate_robustness", "evaluate_cifar_c",
    "figures", "result_tables", "save_results",
]
