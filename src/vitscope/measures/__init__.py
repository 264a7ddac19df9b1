"""Representation measures of ViT, HDVW, RAGHU, ConViT and CB: pure functions over tensors and
streaming classes (``update`` / ``compute`` / ``reset`` / ``merge`` / ``sync``) with additive states.
"""
from vitscope.measures._streaming import StreamingMeasure
from vitscope.measures.attention import (
    AttentionDistance,
    AttentionEntropy,
    Nonlocality,
    RelativeDistance,
    attention_distance,
    attention_entropy,
    class_token_mass,
    nonlocality,
    relative_distance,
)
from vitscope.measures.calibration import Calibration, calibration
from vitscope.measures.cka import MinibatchCKA, cka, hsic1
from vitscope.measures.convit import (
    GPSACentres,
    gpsa_attention_centres,
    gpsa_gates,
    gpsa_layers,
    gpsa_positional_attention,
)
from vitscope.measures.embeddings import (
    PatchEmbeddingComponents,
    patch_embedding_components,
    position_embedding_grid,
    position_embedding_similarity,
)
from vitscope.measures.linear_probe import ProbeAccuracy, RidgeFit, probe_features, ridge_classifier
from vitscope.measures.norms import RatioOfNorms, ratio_of_norms
from vitscope.measures.rollout import attention_rollout
from vitscope.measures.spectral import (
    FeatureVariance,
    FourierLogAmplitude,
    feature_variance,
    fourier_frequencies,
    fourier_log_amplitude,
)

__all__ = [
    "StreamingMeasure",
    "Calibration", "calibration",
    "attention_entropy", "attention_distance", "class_token_mass", "nonlocality", "relative_distance",
    "AttentionEntropy", "AttentionDistance", "Nonlocality", "RelativeDistance",
    "cka", "hsic1", "MinibatchCKA",
    "ratio_of_norms", "RatioOfNorms",
    "RidgeFit", "ProbeAccuracy", "probe_features", "ridge_classifier",
    "gpsa_gates", "gpsa_attention_centres", "gpsa_layers", "GPSACentres", "gpsa_positional_attention",
    "attention_rollout",
    "patch_embedding_components", "PatchEmbeddingComponents", "position_embedding_similarity",
    "position_embedding_grid",
    "fourier_log_amplitude", "fourier_frequencies", "feature_variance", "FourierLogAmplitude", "FeatureVariance",
]
