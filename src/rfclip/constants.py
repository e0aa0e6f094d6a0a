"""Constants taken from papers and reference code, in one place, each with its source.

Abbreviations: RF-CLIP = Li et al., "Target Refocusing via Attention Redistribution for Open-Vocabulary
Semantic Segmentation: An Explainability Perspective", AAAI 2026 (arXiv 2511.16170). FSA = Chi et al.,
"Plug-in Feedback Self-adaptive Attention in CLIP for Training-free Open-Vocabulary Segmentation",
ICCV 2025 (arXiv 2508.20265). NACLIP = Hajimiri et al., WACV 2025. SCLIP = Wang et al., ECCV 2024.
ClearCLIP = Lan et al., ECCV 2024. ProxyCLIP = Lan et al., ECCV 2024.
"""

# --- image normalisation (OpenAI CLIP; SCLIP/NACLIP configs use the same values x 255) -------------
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
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

# --- FSA (ICCV 2025; official code FSA_Proxy_segmentor.py / open_clip/transformer.py) -------------
FSA_PATCH_LOGIT_SCALE = 20.0  # compute_logits(..., logits_scale=20) for the first pass
FSA_UNIFORM_LOGIT_SCALE = 35.0  # scale of the uniform-attention baseline logits
FSA_PRUNE_MASS = 0.45  # nucleus mass kept per row in confidence-based pruning
FSA_LAMBDA = {"default": 3.0, "vit_h": 2.3, "mae": 4.5}  # hyper_param.txt: B/L with DINO/SAM/DINOv2, H/14, MAE

# --- ProxyCLIP (ECCV 2024; segmentor defaults) ------------------------------------------------------
PROXY_BETA = 1.2  # shift of the mean similarity
PROXY_GAMMA = 3.0  # scale before the softmax
