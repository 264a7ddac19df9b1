"""Caption of every report figure: what the measure is (its definition) and what the paper found.

Sources (see /work/shared/METHODS.md): ViT (Dosovitskiy et al. 2021), HDVW (Park & Kim 2022, "How Do Vision
Transformers Work?"), RAGHU (Raghu et al. 2021, "Do Vision Transformers See Like CNNs?"), CONVIT (d'Ascoli
et al. 2021), CB (Hyeon-Woo et al. 2023, "Scratching Visual Transformer's Back with Uniform Attention").
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Caption", "CAPTIONS", "caption"]


@dataclass(frozen=True)
class Caption:
    title: str
    definition: str
    finding: str


CAPTIONS: dict[str, Caption] = {
    "summary": Caption(
        "Accuracy, NLL and ECE",
        "Top-1 accuracy, mean negative log-likelihood (nats) and expected calibration error over 10 equal-width "
        "confidence bins, sum_b (n_b/N) |acc_b - conf_b| (last bin closed on the right), from each output found.",
        "HDVW reports NLL and ECE alongside accuracy (MSAs improve predictive performance and uncertainty); CB: "
        "context broadcasting raises ViT accuracy at zero parameters.",
    ),
    "training_curves": Caption(
        "Training curves",
        "Per epoch of the training run (metrics.jsonl): validation top-1 accuracy and NLL, and the training loss.",
        "CONVIT: ConViT beats DeiT/ViT at small data fractions; HDVW: AlterNet beats ResNet and ViT on small "
        "datasets.",
    ),
    "cka": Caption(
        "CKA between layers",
        "Minibatch linear CKA between the residual streams leaving every pair of sub-layers: per batch the "
        "unbiased HSIC_1 of the linear Gram matrices, CKA = mean HSIC(K,L) / sqrt(mean HSIC(K,K) mean HSIC(L,L)).",
        "RAGHU: ViT representations are much more uniform across layers than ResNet's, whose CKA shows a grid "
        "(stage) pattern with clearly separated lower and higher layers.",
    ),
    "cka_checkpoints": Caption(
        "CKA between two checkpoints of one run",
        "Minibatch linear CKA between every layer of the network at one epoch (rows) and at another (columns) on "
        "the same images (vitscope compare RUN@a RUN@b); the diagonal is how much each layer changed in between.",
        "RAGHU compare representations across training and data size: ViT's lower layers need much data (or "
        "training) to learn local, ResNet-like representations.",
    ),
    "linear_probe": Caption(
        "Few-shot linear probes per layer",
        "Held-out accuracy of a closed-form ridge classifier onto {-1, 1} targets (ViT's few-shot protocol) fitted "
        "on k examples per class of frozen features of each block: the class token and the global average pool "
        "of the spatial tokens (CNNs: of the map); alpha = ridge x mean eigenvalue of the centred features.",
        "RAGHU Fig. 12-13: class information appears late in ViT's class token but is linearly decodable from "
        "the average pool much earlier; ResNet's pooled features gain accuracy gradually with depth.",
    ),
    "cka_cross": Caption(
        "CKA across models",
        "Minibatch linear CKA between every layer of one model (rows) and every layer of another (columns) on "
        "the same images.",
        "RAGHU: ResNet's lower half resembles only the lowest quarter of ViT layers; ViT's highest layers are "
        "dissimilar to ResNet's.",
    ),
    "attention_distance": Caption(
        "Mean attention distance per head",
        "For each query patch sum_j A_ij d_ij with d the Euclidean distance between patch centres in pixels; "
        "mean over queries and images, one dot per head, against depth (class-token row and column dropped without "
        "renormalizing, as in the ViT paper and RAGHU's code: a head's mass on the class token, reported beside "
        "it as class_token_mass, counts as distance 0).",
        "ViT Fig. 7 / RAGHU: lower layers mix local and global heads, higher layers are all global; with "
        "little training data the lower-layer heads fail to become local.",
    ),
    "attention_entropy": Caption(
        "Attention entropy per layer",
        "H_i = -sum_j A_ij ln A_ij, mean over queries and images, per head (dots) and its mean over heads "
        "(line); the dashed line is the upper bound ln N of uniform attention over N tokens.",
        "CB: ViT attention entropy is high, near ln N (ViT-S averages about 4.4 nats against ln 197 = 5.28); "
        "context broadcasting lowers it, mostly in deep layers.",
    ),
    "nonlocality": Caption(
        "Nonlocality per head",
        "(1/N) sum_ij A_ij ||delta_ij|| in patch units with A averaged over the batch, per head, against depth.",
        "CONVIT: GPSA heads start local (convolutional init) and escape locality during training, the early "
        "layers staying more local than the late ones.",
    ),
    "relative_distance": Caption(
        "Relative distance of interaction",
        "Attention-weighted distance between token positions normalized to [0, 1], excluding each token's "
        "attention to itself, per head (dots) and mean (line), per layer.",
        "CB: context broadcasting leaves the range of interaction unchanged while lowering the entropy.",
    ),
    "gpsa_gates": Caption(
        "GPSA gates per head",
        "ConViT gate g = sigmoid(gating_param) of each GPSA head: 1 = purely positional (convolution-like) "
        "attention, 0 = purely content attention.",
        "CONVIT: gates start at 0.731 and fall during training; early layers keep larger gates (stay more "
        "local) than late ones.",
    ),
    "attention_rollout": Caption(
        "Attention rollout on images",
        "Attention rollout (Abnar & Zuidema 2020): per layer the head-averaged attention plus the identity, rows "
        "renormalised, multiplied through the layers; shown is the class token's row over the patches, overlaid on "
        "each image on one colour scale. Without a class token (pooled ViTs) the mean over patch queries; ConViT: "
        "the class token's row of its MHSA layers carried through the rollout of its GPSA layers.",
        "ViT Fig. 6: attention from the output token to the input space concentrates on regions semantically "
        "relevant for classification.",
    ),
    "attention_query_maps": Caption(
        "Attention of one query patch, per layer and head",
        "Post-softmax attention row of the outlined query patch for every head (columns) of every attention layer "
        "(rows), on one power-law colour scale; windowed attention shows the query's window.",
        "RAGHU and ViT Fig. 7: lower layers mix local heads (mass near the query) with global ones; with little "
        "data lower layers fail to become local. HDVW: MSAs aggregate (spatially smooth) feature maps.",
    ),
    "gpsa_positional": Caption(
        "ConViT gates and positional attention",
        "Left: gate g = sigmoid(gating_param) per GPSA layer and head (1 = positional). Right: each head's "
        "positional attention softmax(pos_proj(r)) of the query patch, before gating, on one colour scale.",
        "CONVIT Fig. 5: heads start as local, shifted kernels (a k x k grid of centres) and some learn to "
        "escape locality; gates fall during training, least in the early layers.",
    ),
    "patch_embedding_components": Caption(
        "Patch-embedding principal components",
        "The D learned patch-embedding filters (C x P x P each), mean-centred, decomposed by SVD; the top "
        "components (right singular vectors, orthonormal, by explained variance) drawn as images, each scaled "
        "to its own range.",
        "ViT Fig. 7 left: the top components of a trained ViT-L/32 resemble plausible basis functions for a "
        "low-dimensional representation of the fine structure within each patch.",
    ),
    "position_embedding_similarity": Caption(
        "Position-embedding similarity",
        "Tile (i, j): cosine similarity between the learned position embedding of patch (i, j) and that of every "
        "other patch (prefix-token entries excluded), on one scale from -1 to 1.",
        "ViT Fig. 7 centre: closer patches have more similar embeddings, and a row-column structure emerges "
        "(patches in the same row or column are similar); at random initialisation no such structure exists.",
    ),
    "train_gpsa_gates": Caption(
        "GPSA gates over training",
        "Mean over heads of g = sigmoid(gating_param) per GPSA layer (line; band = min to max over heads), "
        "against epochs trained (0 = initial weights).",
        "CONVIT: gates fall during training, more in late layers; early layers stay more convolutional.",
    ),
    "train_nonlocality": Caption(
        "Nonlocality over training",
        "Nonlocality (1/N) sum_ij A_ij ||delta_ij|| (patch units) per layer on a fixed probe batch, mean over "
        "heads, against epochs trained (0 = initial weights).",
        "CONVIT: GPSA layers start local and become less local as the gates fall; the early layers remain "
        "more local.",
    ),
    "train_attention_entropy": Caption(
        "Attention entropy over training",
        "Mean attention entropy -sum_j A_ij ln A_ij per layer on a fixed probe batch, mean over heads, against "
        "epochs trained (0 = initial weights).",
        "CB: trained ViT attention stays high-entropy (near ln N); CB lowers it in deep layers.",
    ),
    "train_attention_distance": Caption(
        "Mean attention distance over training",
        "Mean attention distance (pixels) per layer on a fixed probe batch, mean over heads, against epochs "
        "trained (0 = initial weights); class token dropped without renormalizing (the literature's definition).",
        "RAGHU: with enough data lower layers learn local heads; with little data they stay global.",
    ),
    "train_probe": Caption(
        "Probe over training",
        "Per-layer value of the probe on a fixed batch (mean over heads), against epochs trained.",
        "See the matching per-layer figure.",
    ),
    "ratio_of_norms": Caption(
        "Ratio of norms ||z|| / ||f(z)||",
        "Norm of the residual stream z entering a sub-layer over the norm of its branch output f(z) (attention "
        "or MLP after its LayerNorm), averaged over tokens: class token and spatial tokens separately, per block "
        "(log scale). For CNN blocks, skip path over residual branch.",
        "RAGHU: the class token has a high ratio (skip dominates) in early layers and a low one late; spatial "
        "tokens the reverse, so the class token is mostly built in the final layers.",
    ),
    "fourier": Caption(
        "Delta log amplitude at the highest frequency",
        "Per sub-layer output: 2-D FFT of the feature maps (prefix tokens dropped), log amplitude averaged over "
        "images and channels along the half-diagonal, minus its value at frequency 0; the value at the highest "
        "frequency against normalized depth. Shaded: MSA sub-layers.",
        "HDVW Fig. 2: MSAs reduce high-frequency amplitude (low-pass filters) while convolutions amplify it "
        "(high-pass filters).",
    ),
    "fourier_curves": Caption(
        "Relative log amplitude against frequency",
        "Delta log amplitude LogAmp(f) - LogAmp(0) along the half-diagonal of the centred spectrum, frequency "
        "from 0 to pi, one curve per sub-layer coloured by depth.",
        "HDVW Fig. 2a: ViT feature maps lose high-frequency amplitude with depth; ResNet's keep it.",
    ),
    "feature_variance": Caption(
        "Feature-map variance",
        "Variance over spatial positions per channel, mean over channels and images, of each sub-layer's "
        "output against normalized depth (log axis when it spans decades). Shaded: MSA sub-layers.",
        "HDVW: MSAs reduce feature-map variance (they behave like spatial smoothing / ensembles) while "
        "convolutions and MLPs increase it.",
    ),
    "hessian": Caption(
        "Hessian eigenvalue spectrum",
        "Density of the top (largest-magnitude) Hessian eigenvalues of the training NLL, k per minibatch, over "
        "minibatches (Lanczos or power iteration with deflation, model in eval mode); the fraction of negative "
        "eigenvalues is shown in the legend.",
        "HDVW: ViTs have small-magnitude Hessian eigenvalues and, at small data, many negative ones (a "
        "non-convex loss), which the weak inductive bias of MSAs produces; strong inductive biases (convs) and "
        "more data suppress them.",
    ),
    "landscape": Caption(
        "Loss landscape",
        "Loss along random Gaussian directions normalized per filter to the weights' filter norms (Li et al. "
        "2018), around the trained weights at the origin.",
        "HDVW: MSAs flatten the loss landscape (and spatial smoothing flattens CNNs'); ViT's loss is "
        "non-convex at small data.",
    ),
    "lesion": Caption(
        "Lesion study",
        "Accuracy drop (intact minus lesioned top-1) when one residual block (or sub-layer) is removed and only "
        "its skip path kept, one at a time.",
        "HDVW: in a ResNet the early blocks matter most; in Swin/AlterNet-like models removing an MLP at the "
        "start of a stage or an MSA at the end of a stage hurts most.",
    ),
    "localization": Caption(
        "Localization probe",
        "Held-out accuracy of a linear probe predicting each spatial token's position from its features at "
        "every block output (or the cell of a coarser grid holding it: `--position-grid`); dashed: chance, the largest "
        "class's share (1/(h w) with one class per position).",
        "RAGHU: ViTs with a class token keep spatial position well through depth; global average pooling "
        "weakens it in the top layers.",
    ),
    "reliability": Caption(
        "Reliability diagram",
        "Accuracy against mean confidence in 10 equal-width confidence bins (last bin closed at 1); the "
        "diagonal is perfect calibration, bar width shows the bin, ECE = sum_b (n_b/N) |acc_b - conf_b|.",
        "HDVW reports NLL and ECE with accuracy: MSAs improve predictive uncertainty as well as accuracy.",
    ),
    "robustness_frequency": Caption(
        "Accuracy against noise frequency",
        "Top-1 accuracy under additive noise whose Fourier transform is restricted to an annulus around "
        "frequency f (width 0.2 of the band, fixed L2 norm), f from 0 (low) to 1 (highest); dashed: clean.",
        "HDVW Fig. 4: MSAs are robust to high-frequency noise while convolutions are vulnerable to it; ViTs "
        "are more robust than ResNets to high-frequency noise.",
    ),
    "robustness_eps": Caption(
        "Accuracy against adversarial eps",
        "Top-1 accuracy under L-infinity FGSM and PGD attacks in [0, 1] pixel space, against eps (in /255).",
        "CB evaluates ViTs with and without context broadcasting under FGSM and centre occlusion.",
    ),
    "robustness_corruptions": Caption(
        "Accuracy under common corruptions",
        "Top-1 accuracy under each CIFAR-C / ImageNet-C style corruption, mean over severities 1-5 (bars) with "
        "severity 1 and 5 marked; dashed: clean.",
        "HDVW and its companion paper: MSAs and spatial smoothing (blurs) improve robustness to corruptions.",
    ),
}


def caption(key: str) -> Caption:
    """The caption of figure ``key``; ``train_<measure>`` falls back to the generic over-training caption."""
    if key in CAPTIONS:
        return CAPTIONS[key]
    if key.startswith("compare_") and key[8:] in CAPTIONS:
        base = CAPTIONS[key[8:]]
        measure = key[8:]
        if measure in ("attention_entropy", "attention_distance", "nonlocality"):
            prefix = "One line per model, the mean over heads per layer. "
        elif measure in ("fourier", "feature_variance"):
            prefix = "One line per model; MSA sub-layers are shaded in each model's own section. "
        else:
            prefix = "One line (or histogram) per model. "
        definition = base.definition.replace(" Shaded: MSA sub-layers.", "")
        return Caption(base.title.replace(" per head", "") + " (all models)", prefix + definition, base.finding)
    if key.startswith("train_"):
        return CAPTIONS["train_probe"]
    raise KeyError(f"no caption for figure {key!r}")
