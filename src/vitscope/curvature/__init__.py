"""Curvature of the loss: Hessian-vector products, top eigenvalues, trace, spectral density, HDVW's
eigenvalue spectrum and filter-normalized loss landscapes (Li et al. 2018; Park & Kim 2022)."""
from vitscope.curvature.density import (
    DensityResult,
    TraceResult,
    hessian_trace,
    spectral_density,
)
from vitscope.curvature.eigen import EigenResult, lanczos, power_iteration, top_eigenvalues
from vitscope.curvature.hvp import (
    HessianOperator,
    analysis_mode,
    cross_entropy,
    explicit_attention,
    hessian_vector_product,
    l2_penalty,
    select_params,
)
from vitscope.curvature.landscape import (
    LandscapeResult,
    load_directions,
    loss_landscape,
    normalize_direction,
    random_directions,
    save_directions,
)
from vitscope.curvature.spectrum import SpectrumResult, block_groups, eigenvalue_spectrum, gaussian_kde

__all__ = [
    "DensityResult", "EigenResult", "HessianOperator", "LandscapeResult", "SpectrumResult", "TraceResult",
    "analysis_mode", "block_groups", "cross_entropy", "eigenvalue_spectrum", "explicit_attention",
    "gaussian_kde", "hessian_trace", "hessian_vector_product", "l2_penalty", "lanczos", "load_directions",
    "loss_landscape", "normalize_direction", "power_iteration", "random_directions", "save_directions",
    "select_params", "spectral_density", "top_eigenvalues",
]
