"""``vitscope.probe``: every forward measure of the papers in one pass over a data loader.

One capture per batch feeds all requested measures (RAGHU's CKA and ratio of norms, HDVW's Fourier
log amplitude and feature variance, the attention measures of ViT/RAGHU, ConViT and CB). Every measure
keeps additive states, so memory does not grow with the number of examples and ranks merge by summing.

Cost: each sub-layer's residual-stream record is reduced as the forward produces it (scanned for NaN/Inf
once, converted to float64 once for Fourier and variance; CKA Grams of float32 activations by a float32
matmul after centring over the batch, within ~1e-8 of float64) and then dropped, so a batch's activations
are never all held; attention maps are checked once per batch and read by the four attention measures
without re-checking (``validate=False``). No value is read on the host within the pass: the checks are 0-d
device flags (``_DeviceChecks``) read every 64 batches and at the end, raising the first failure with its batch
and layer (so a bad batch is reported up to 64 batches later, not at once); on a GPU the queue does not drain
after every sub-layer. Fourier and variance stay float64 on a GPU too: their reductions are memory-bound (the
DFT is a (2F, S) matrix times the tokens, ~0.5 GFLOP per ViT-B/16 record at batch 128), so float64 costs the
bytes of one float64 copy per record (~9 GB a batch, ~2 ms at H200 bandwidth, ~2% of the forward), while float32
DFT coefficients would lose digits at high frequencies under the large offsets trained ViTs carry.
"""
from __future__ import annotations

from vitscope.probing._checks import _DeviceChecks
from vitscope.probing.adapters import ATTENTION_MEASURES, PROBE_MEASURES
from vitscope.probing.attention_images import ATTENTION_FILE, AttentionMaps, attention_maps, load_attention_maps
from vitscope.probing.probe_pass import not_applicable, probe
from vitscope.probing.result import ProbeResult

__all__ = ["probe", "not_applicable", "ProbeResult", "PROBE_MEASURES", "ATTENTION_MEASURES", "attention_maps",
           "AttentionMaps", "load_attention_maps", "ATTENTION_FILE", "_DeviceChecks"]
