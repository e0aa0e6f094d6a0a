"""Constants taken from papers and reference code, in one place, each with its source.

Abbreviations: RF-CLIP = Li et al., "Target Refocusing via Attention Redistribution for Open-Vocabulary
Semantic Segmentation: An Explainability Perspective", AAAI 2026 (arXiv 2511.16170). FSA = Chi et al.,
"Plug-in Feedback Self-adaptive Attention in CLIP for Training-free Open-Vocabulary Segmentation",
ICCV 2025 (arXiv 2508.20265). NACLIP = Hajimiri et al., WACV 2025. SCLIP = Wang et al., ECCV 2024.
ClearCLIP = Lan et al., ECCV 2024. ProxyCLIP = Lan et al., ECCV 2024.
"""

# --- image normalisation (OpenAI CLIP) ---------------------------------------------------------------
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The same on the 0-255 scale, as rfclip's preprocessing takes them (InferenceConfig.pixel_mean / pixel_std).
CLIP_PIXEL_MEAN = tuple(255 * m for m in CLIP_MEAN)
CLIP_PIXEL_STD = tuple(255 * s for s in CLIP_STD)
# CLIP's x 255 rounded to 3 decimals, as the mmseg SegDataPreProcessor of the SCLIP, NACLIP, ClearCLIP, ProxyCLIP,
# FSA and RF-CLIP code normalises: mean=[122.771, 116.746, 104.094], std=[68.501, 66.632, 70.323].
MMSEG_CLIP_MEAN = (122.771, 116.746, 104.094)
MMSEG_CLIP_STD = (68.501, 66.632, 70.323)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # VFM input normalisation in ProxyCLIP / FSA
IMAGENET_STD = (0.229, 0.224, 0.225)

# --- inference protocol (SCLIP / NACLIP configs; RF-CLIP follows them) ---------------------------
SHORT_SIDE = 336  # Resize(scale=(2048, 336), keep_ratio=True)
LONG_SIDE_CAP = 2048
SLIDE_CROP = 224
SLIDE_STRIDE = 112
LOGIT_SCALE = 40.0  # NACLIP configs and RF-CLIP released code; SCLIP uses 50/65 on some datasets
PAMR_STEPS = 10  # NACLIP pamr_steps
PAMR_DILATIONS = (8, 16)  # NACLIP pamr_stride

# --- NACLIP (WACV 2025, Sec. 3; released code arch='reduced', gaussian_std=5) --------------------
NACLIP_GAUSSIAN_STD = 5.0  # sigma of the neighbourhood prior, in patch units

# --- RF-CLIP (AAAI 2026) ---------------------------------------------------------------------------
# Distraction dimensions D_dis (0-based channels of the residual stream). The paper text names
# 4, 162, 474 (B/16) and 250, 261, 437 (L/14); the full lists are the paper's footnote 3 and the
# authors' released code. Only the two backbones the paper studies: ViT-L-14-336 (other weights, fine-tuned at
# 336 px) is calibrated like any other model (`rfclip calibrate`), not assumed to share ViT-L/14's dims.
DISTRACTION_DIMS = {
    ("ViT-B-16", "openai"): (4, 162, 189, 326, 429, 474, 633, 713),
    ("ViT-L-14", "openai"): (250, 261, 437, 650, 720, 779, 936, 1005),
}
RF_TAU_MULT = 5.0  # tau = 5 / d, Fig. 6(a): best on all 8 benchmarks
# Attenuation factor beta of eq. 9-12: the fraction of each row's attention to distraction tokens that is moved to
# the defocused tokens. 0.7: the paper's value (its attenuation-factor analysis, Fig. 6(b); equations recovered in
# spec rf-clip.md section 10). 0.4: the released code's (unused) refocus routine, which keeps 0.6 of sink columns.
RF_BETA = 0.7
RF_BETA_CODE = 0.4
# Embedding redistribution, eq. 13: f_i[j] = 1/8 sum_{i' in O_i} f_i'[j], the 8 neighbours of the 3x3 window,
# centre excluded; the paper does not say how the grid border is handled (here: the in-grid neighbours).
RF_EMBED_EXCLUDE_CENTER = True
# The released code's filter instead: all channels, zero-padded 3x3 mean / 9 (centre included), 0.6 x + 0.4 mean.
RF_EMBED_BLEND_CODE = 0.4
RF_EMBED_KERNEL = 3  # neighbourhood of embedding redistribution, Table 5 (3x3 best)
RF_THETA_ATTN = 0.1  # ViT-L/14 attention condition (App. "Analysis in CLIP-L/14"); value from released code
RF_CALIBRATE_TOPK = 8  # number of distraction dimensions per backbone (8 in both released lists)
RF_CUT_THRESHOLD = "mean"  # graph-cut threshold on the Fiedler vector, Table 5 (mean 38.2 > Otsu 37.9 avg mIoU)
RF_DEFOCUS_SIM = "kk_avg"  # similarity for the cut: key-key attention averaged over layers, Table 5 (IV)
RF_REDISTRIBUTE_TO = "defocused"  # where the freed attention goes, Table 6 (defocused > non-distraction > [CLS])
RF_PROXY_ATTN = "kk_layer_avg"  # last layer's proxy attention: layer-averaged key-key, Table 7 (IV), eq. 14
RF_LAYERS = "all"  # layers whose attention is redistributed, Table 7 (VIII: all layers best)
# Extra attention condition for CLIP ViT-L/14 (App. "Analysis in CLIP-L/14"), switched on by attn_condition="auto"
# for encoders of this geometry: (layers, width, patch size).
RF_ATTN_CONDITION_GEOMETRY = ((24, 1024, 14),)
# Defocus eigen-solver (implementation choices, not the paper; measured in benchmarks/fiedler.py): repeated squaring
# checked from 2^4 to 2^16 power steps, stopping once |M z - mu z| <= 1e-6 (fp32 reaches 2e-7 - 5e-7 on graphs of
# 196 to 784 nodes; 2e-6 still let a token 3e-5 from the threshold change sides on a graph with eigengap 3e-3), with
# torch.linalg.eigh for the graphs that do not get there. Graphs whose eigengap lambda3 - lambda2 is below 1e-4 are
# degenerate (the Fiedler vector is not determined): no graph-cut choice there.
RF_POWER_MIN_SQUARINGS = 4
# The default solver ("lanczos", benchmarks/fiedler.py): up to 44 Krylov steps from the previous layer's Fiedler
# vector (the layer-averaged graph changes little between layers), checked by the same residual rule and a proved
# eigengap; graphs that do not get there go to the squaring solver, then eigh.
RF_LANCZOS_MAX_STEPS = 44
RF_POWER_MAX_SQUARINGS = 16
RF_FIEDLER_RESIDUAL_TOL = 1e-6
RF_EIGENGAP_TOL = 1e-4
# Paper's Table 2 RF-CLIP rows (mIoU %, paper column order), used by `rfclip eval-all` for comparison.
PAPER_COLUMNS = ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade20k")
PAPER_RFCLIP_MIOU = {
    ("ViT-B-16", False): (64.8, 36.4, 37.9, 87.0, 39.8, 26.3, 41.3, 20.4),
    ("ViT-B-16", True): (67.2, 37.9, 39.1, 87.0, 41.4, 27.5, 43.0, 21.0),
    ("ViT-L-14", False): (65.8, 36.7, 41.8, 89.1, 40.2, 26.7, 41.4, 22.4),
    ("ViT-L-14", True): (68.1, 38.1, 42.0, 89.1, 40.8, 27.8, 43.0, 23.4),
}

# --- RF-CLIP as released (github.com/liblacklucy/RF-CLIP at c2b333e; spec rf-clip-released-code.md) -------
# Method `rfclip_release` and settings preset `rfclip_release`. Line numbers as in the spec (files of c2b333e).
RELEASE_COMMIT = "c2b333e64b57ba17a62e1564759c62cc9fb70cec"
RELEASE_TAU_MULT = 5.0  # clip/model.py feat_denoising(sigma=5.0): phi > sigma * (1/d) (L212-221)
RELEASE_PHI_NORM = "minshift"  # feat_denoising: (f - min f) / clamp(sum(f - min f), 1e-8) (L215-216)
RELEASE_EMBED_KERNEL = 3  # feat_denoising: depthwise Conv2d(C, C, 3, padding=1), weights 1/9: zero padding,
RELEASE_EMBED_PADDING = "zero"  # centre included, always / 9, all channels (L222-232)
RELEASE_EMBED_BLEND = 0.4  # feat_denoising(alpha=0.4): x[1:] <- 0.6 x[1:] + 0.4 (mean where detected) (L233-240)
RELEASE_FIRST_FILTERED_LAYER = 1  # forward: the filter runs after every block, so layer 0's input (ln_pre) is
#                                  # not filtered (L289-296)
RELEASE_ENHANCE_THRESHOLD = 0.4  # feat_enhancing(beta=0.4): simi[simi < beta] = 0 (L242-267)
RELEASE_TOPK_PATCHES = 2  # custom_segmentor.py _compute_topk_similarities(k=2) (L106-158)
# Image normalisation: MMSEG_CLIP_MEAN / MMSEG_CLIP_STD above (custom_segmentor.py SegDataPreProcessor, L44).
# configs/cfg_*.py: global_semantics_weight, mean_vector_weight, h_threshold, prob_thd, slide_crop (224 = the
# segmentor default 224/112, custom_segmentor.py L37-38); Cityscapes (cfg_city_scapes.py) also resizes to 560 and
# takes each crop's own [CLS] (forward_slide's dataset check).
RELEASE_DATASET_EXTRAS = {
    "voc21": (0.1, 0.03, 0.10, 0.1, 0),
    "voc20": (0.4, 0.02, 0.10, 0.0, 224),
    "context60": (0.25, 0.04, 0.09, 0.1, 224),
    "context59": (0.25, 0.04, 0.09, 0.0, 224),
    "coco_object": (0.25, 0.01, 0.10, 0.1, 224),
    "coco_stuff": (0.2, 0.02, 0.02, 0.0, 0),
    "ade20k": (0.3, 0.05, 0.06, 0.0, 224),
    "cityscapes": (0.1, 0.03, 0.14, 0.0, 224),
}
# Method defaults: the released VOC21 values (cfg_voc21.py).
RELEASE_GSW, RELEASE_MVW, RELEASE_H_THRESHOLD = RELEASE_DATASET_EXTRAS["voc21"][:3]

# --- FSA (ICCV 2025; official code FSA_Proxy_segmentor.py / open_clip/transformer.py) -------------
FSA_PATCH_LOGIT_SCALE = 20.0  # compute_logits(..., logits_scale=20) for the first pass
FSA_UNIFORM_LOGIT_SCALE = 35.0  # scale of the uniform-attention baseline logits
FSA_PRUNE_MASS = 0.45  # nucleus mass kept per row in confidence-based pruning
# lambda (sharpening), FSA's hyper_param.txt: "For sam, dino, dinov2 as VFMs: ViT-B16 and ViT-L14: lamda = 3.0,
# ViT-H14: lamda = 2.3. For MAE as VFMs: lamda = 4.5 for all models" (ViT-* is the CLIP backbone; SAM B/L/H alike).
# Bases without a VFM take the SAM/DINO/DINOv2 values (FSA publishes none for them).
FSA_LAMBDA = {"default": 3.0, "vit_h": 2.3, "mae": 4.5}
FSA_LAMBDA_VFMS = ("sam", "dino", "dinov2")  # the VFM kinds whose lambda is "default" / "vit_h"

# --- ProxyCLIP (ECCV 2024; segmentor defaults) ------------------------------------------------------
PROXY_BETA = 1.2  # shift of the mean similarity
PROXY_GAMMA = 3.0  # scale before the softmax

# CorrCLIP v1 (zdk258/CorrCLIP at 103bc18, CorrCLIPv1/open_clip/transformer.py VisionTransformer.forward and
# corrclip_segmentor.py; spec corrclip.md §1.2-1.3)
CORRCLIP_SPATIAL_WEIGHT = 1.0  # ALPHA: weight of the spatial branch (mean of intermediate layers)
CORRCLIP_SEMANTIC_WEIGHT = 0.5  # BETA: weight of the semantic branch (mask class tokens)
CORRCLIP_TAU = 4.0  # TAU: attn = softmax(TAU * S) over the DINO q+k cosine similarities
CORRCLIP_MERGE_EPS = 0.2  # DBSCAN(eps=0.2, min_samples=1) on max(sim) - sim of the region mean features
CORRCLIP_NUM_SPATIAL = {12: 5, 24: 12, 32: 28}  # NUM_SPATIAL per depth; any other depth L: L - 4
CORRCLIP_PAD_MULTIPLE = 56  # compute_padsize(H, W, 56): crops zero-padded (centred) to multiples of 56 px
CORRCLIP_PAD_REGION = 10000  # the region id of the padding (and the base of the merged cluster ids: cluster + 10000)
# CorrCLIPv1/README.md, 8-benchmark average mIoU (VOC21, PC60, Object, VOC20, PC59, Stuff, City, ADE), per mask source
PAPER_CORRCLIP_AVG = {
    "ViT-B": {"sam2_32": 51.0, "sam2_8": 50.4, "mask2former": 50.3, "eomt": 52.3, "entityseg": 52.4},
    "ViT-L": {"sam2_32": 53.6, "sam2_8": 52.9, "mask2former": 52.7, "eomt": 54.9, "entityseg": 55.4},
}
# CorrCLIPv1/README.md per-dataset mIoU in PAPER_COLUMNS order (VOC21, PC60, Object, VOC20, PC59, Stuff, City, ADE)
PAPER_CORRCLIP_MIOU = {
    ("ViT-B", "SAM2_32"): (74.8, 44.2, 43.7, 88.8, 48.8, 31.6, 49.4, 26.9),
    ("ViT-B", "EntitySeg"): (76.2, 45.7, 44.5, 89.6, 50.7, 32.4, 51.6, 28.6),
    ("ViT-L", "SAM2_32"): (76.7, 44.9, 49.4, 91.5, 50.8, 34.0, 51.1, 30.7),
    ("ViT-L", "EntitySeg"): (78.9, 46.8, 51.0, 92.0, 53.0, 34.9, 53.7, 32.6),
}
