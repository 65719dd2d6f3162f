"""Config keys added by IAUNet on top of detectron2's defaults.

Every key carries a one-line comment; defaults follow the thesis (Prytula 2025, §3-§4) and the
authors' reference code where the thesis is silent.
"""

import os
import sys
from typing import Any, Sequence

from detectron2.config import CfgNode as CN

# what users keep: the outputs' score threshold of a model that has no tuned one
# (MODEL.IAUNET.TEST.OUTPUT_SCORE_THRESH), iaunet-predict's --score-threshold, the evaluation's F1
DEFAULT_SCORE_THRESH = 0.5


class ConfigError(ValueError):
    """A config file or KEY VALUE override that cannot be used; the message names the file or the
    key."""


def one_line(e: BaseException) -> str:
    """An exception as one line: its message, prefixed with its type unless it is a
    ValueError/OSError or one of yacs' validation assertions ("Non-existent key: ...")."""
    msg = str(e).strip().replace("\n", " ")
    return (
        msg
        if isinstance(e, (ValueError, OSError, AssertionError)) and msg
        else f"{type(e).__name__}: {msg}"
    )


def merge_config(cfg: CN, config_file: str = "", opts: Sequence = ()) -> CN:
    """``cfg.merge_from_file(config_file)`` (if given) then ``cfg.merge_from_list(opts)``, with a
    ConfigError naming the file or the override instead of yacs' assertion traceback (unknown key,
    odd list, wrong type)."""
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file not found: {config_file}")
        try:
            # allow_unsafe=False: yaml.safe_load only (detectron2's default falls back to
            # yaml.unsafe_load, which builds any Python object a file names: a config is data).
            cfg.merge_from_file(config_file, allow_unsafe=False)
        except Exception as e:  # yaml syntax, unknown keys, bad _BASE_, Python tags
            raise ConfigError(f"cannot use config file {config_file}: {one_line(e)}") from None
    try:
        cfg.merge_from_list(list(opts))
    except Exception as e:
        raise ConfigError(
            f"invalid config override {' '.join(map(str, opts))}: {one_line(e)}"
        ) from None
    if "CHANNELS" in cfg.INPUT:
        fit_input_channels(cfg)
    return cfg


def fit_input_channels(cfg: CN) -> None:
    """Check ``INPUT.CHANNELS`` and give ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD`` one entry per channel:
    three equal entries (a gray model's) become that many; other lengths are an error naming the
    keys."""
    channels = tuple(cfg.INPUT.CHANNELS)
    for c in channels:
        index = isinstance(c, int) and not isinstance(c, bool) and c >= 0
        if not (index or (isinstance(c, str) and c.strip())):
            raise ConfigError(
                f"INPUT.CHANNELS entries are channel indices >= 0 or channel names, got {c!r}"
            )
    if len(set(map(str, channels))) != len(channels):
        raise ConfigError(f"INPUT.CHANNELS names a channel twice: {channels}")
    n = len(channels)
    if not n or len(cfg.MODEL.PIXEL_MEAN) == n:
        return
    for key in ("PIXEL_MEAN", "PIXEL_STD"):
        values = list(cfg.MODEL[key])
        if len(values) != 3 or len(set(values)) != 1:
            raise ConfigError(
                f"INPUT.CHANNELS has {n} channel(s) but MODEL.{key} has {len(values)} entries "
                f"{values}: give one per channel"
            )
        cfg.MODEL[key] = [values[0]] * n


def load_config(config_file: str = "", opts: Sequence = ()) -> CN:
    """detectron2's defaults + IAUNet's keys + ``config_file`` + ``opts`` (``merge_config``:
    ConfigError if bad)."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_iaunet_config(cfg)
    return merge_config(cfg, config_file, opts)


def trained_config(saved: str, source: str = "") -> CN:
    """The config a model was trained with, from the YAML dump saved in its checkpoint
    (``"config"``, :class:`iaunet.checkpoint.AtomicCheckpointer`) or exported file ``source``:
    IAUNet's defaults (keys added since then keep their default) merged with it.

    The saved config is data from whoever sent the file: read with ``yaml.safe_load``, its keys and
    value types checked as for a config file, and a ``_BASE_`` refused (a checkpoint may not pull
    other files in). ConfigError naming ``source`` otherwise."""
    where = f"the config saved in {source or 'the checkpoint'}"
    if not isinstance(saved, str):
        raise ConfigError(f"{where} is a {type(saved).__name__}, not YAML text")
    cfg = load_config()
    try:
        loaded = cfg.load_cfg(saved)  # yacs: yaml.safe_load
    except Exception as e:
        raise ConfigError(f"cannot read {where}: {one_line(e)}") from None
    if "_BASE_" in loaded:
        raise ConfigError(
            f"{where} names _BASE_ {loaded['_BASE_']}: a checkpoint's config may not pull in "
            "other files (refused)"
        )
    try:
        cfg.merge_from_other_cfg(loaded)
    except Exception as e:  # unknown key, wrong value type
        raise ConfigError(f"cannot use {where}: {one_line(e)}") from None
    fit_input_channels(cfg)
    return cfg


def get_key(cfg: CN, key: str) -> Any:
    """The value of the dotted ``key`` (e.g. ``"MODEL.IAUNET.NUM_QUERIES"``) in ``cfg``."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def set_key(cfg: CN, key: str, value: Any) -> None:
    """Set the dotted ``key`` of ``cfg`` to ``value``."""
    path, _, leaf = key.rpartition(".")
    (get_key(cfg, path) if path else cfg)[leaf] = value


def exit_on_config_error(main, prog: str):
    """Run ``main()`` for a command-line tool; a ConfigError ends it with one line on stderr and
    exit status 2."""
    try:
        return main()
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def add_iaunet_config(cfg: CN) -> None:
    """Add IAUNet's keys (``MODEL.IAUNET``, ``MODEL.SWIN``, ``INPUT``, ``SOLVER``, ``TEST``) to
    ``cfg``."""
    cfg.MODEL.IAUNET = CN()
    m = cfg.MODEL.IAUNET
    # --- sizes
    m.NUM_CLASSES = 1  # K, foreground classes (a "no object" class is added internally)
    # N learnable instance queries; 0 = ~1.5 x the most objects in a training image
    # (iaunet.data.auto_config)
    m.NUM_QUERIES = 100
    m.HIDDEN_DIM = 256  # D, channels of the pixel decoder and queries
    m.MASK_DIM = 256  # channels of the pixel embedding E and of the mask embeddings
    m.IN_FEATURES = ["res2", "res3", "res4", "res5"]  # backbone outputs, strides 4..32
    # norm of the pixel decoder and mask head (detectron2 get_norm: BN, SyncBN, naiveSyncBN, GN,
    # ...)
    m.NORM = "BN"
    # --- pixel decoder (U-Net), thesis §3.4
    # how the 1x1 skip joins the upsampled path: concat | add | full (no 1x1 channel reduction)
    m.SKIP_FUSION = "concat"
    m.COORD_CONV = True  # concatenate (x, y) coordinate planes before each decoder stage
    m.SE = True  # squeeze-and-excitation after each decoder stage
    m.MASK_BRANCH = True  # mask branch X_m per level (off: queries attend to the decoder features)
    m.MASK_BRANCH_CONVS = 2  # 3x3 conv+norm+ReLU per mask-branch level
    # E = M(F(res2) + up(X_m)) at 1/4 (eq. 16); off: a full U-Net level at 1/4 feeds M
    m.LIGHT_MASK_HEAD = True
    # stride of E and of the mask logits: 4 (thesis) | 2: E upsampled and joined with two convs on
    # the image (beyond the thesis; iaunet.modeling.pixel_decoder.mask_head)
    m.MASK_STRIDE = 4
    # bilinear x2 upsampling of the U-Net with align_corners (the reference's
    # nn.UpsamplingBilinear2d)
    m.ALIGN_CORNERS = False
    # --- query decoder, thesis §3.5
    m.NHEADS = 8  # attention heads
    m.DIM_FEEDFORWARD = 1024  # FFN hidden size
    m.DROPOUT = 0.1  # dropout in attention and FFN
    m.PRE_NORM = False  # pre-norm blocks (thesis text) instead of post-norm (reference code)
    m.BLOCKS_PER_LEVEL = 3  # decoder blocks per pixel-decoder level (3 levels -> 9 blocks)
    m.DECODER_ORDER = "seq"  # seq: all blocks of 1/32, then 1/16, then 1/8 | round_robin
    m.DEEP_SUPERVISION = True  # losses on every block's prediction (fresh matching each)
    # each query also predicts its object's whole (amodal) outline with a second mask embedding
    # on the same E; pred_masks stay the visible parts (docs/amodal.md; thesis §5.1 future work)
    m.AMODAL = False
    # --- losses and matching, thesis §3.6
    m.CLASS_WEIGHT = 1.0  # weight of the classification loss and cost
    m.MASK_WEIGHT = 5.0  # weight of the sigmoid BCE mask loss and cost
    m.DICE_WEIGHT = 2.0  # weight of the Dice loss and cost
    m.NO_OBJECT_WEIGHT = 0.1  # CE weight of the "no object" class
    m.TRAIN_NUM_POINTS = 12544  # points sampled for the matching costs (and sampled losses)
    m.LOSS_POINT_SAMPLING = False  # losses on sampled points (Mask2Former) instead of full masks
    m.OVERSAMPLE_RATIO = 3.0  # point-sampled losses: oversampling of uncertain points
    m.IMPORTANCE_SAMPLE_RATIO = 0.75  # point-sampled losses: share of importance-sampled points
    # weight of the dense auxiliary losses (foreground, centre-ness) of a 1x1 probe on E, a training
    # aid for few images (iaunet.modeling.dense_supervision); 0 = no probe (thesis)
    m.DENSE_WEIGHT = 0.0
    # --- training-only accelerators (off in the thesis configs; the inference graph is unchanged)
    m.TRAIN = CN()
    # allow random initial weights on a real dataset (MODEL.WEIGHTS "")
    m.TRAIN.FROM_SCRATCH = False
    # queries added when MODEL.WEIGHTS has fewer: fresh (random) | copy (of the trained ones,
    # iaunet.checkpoint.transfer_query_rows)
    m.TRAIN.NEW_QUERIES = "fresh"
    m.TRAIN.QUERY_GROUPS = 1  # Group DETR: groups of N queries, each matched one-to-one (1 = off)
    m.TRAIN.DENOISING = False  # DN-DETR / MaskDINO denoising queries from noised ground-truth boxes
    m.TRAIN.DENOISING_GROUPS = 5  # noised copies of each object (fewer when an image is crowded)
    m.TRAIN.DENOISING_MAX_QUERIES = 100  # denoising queries per image at most
    m.TRAIN.DENOISING_BOX_NOISE = 0.4  # centre shift up to half this x box size; sides x (1 +- it)
    m.TRAIN.DENOISING_LABEL_NOISE = 0.2  # probability of a random label (K > 1)
    # --- inference, thesis §3.5.3 / §4.2
    m.TEST = CN()
    m.TEST.SCORE_THRESH = 0.01  # drop detections whose class prob x maskness is not above this
    # what users get: the score from which a detection is kept in iaunet-predict's outputs (its
    # --score-threshold default), napari's and the matching F1 of evaluation (AP reads the ranked
    # list down to SCORE_THRESH)
    m.TEST.OUTPUT_SCORE_THRESH = DEFAULT_SCORE_THRESH
    # after training, set OUTPUT_SCORE_THRESH to the threshold with the best matching F1@0.5 on the
    # images held out of the training sets (DATASETS.TEST empty), else on the training images;
    # saved in model_final.pth (iaunet.engine.threshold_tuning; StarDist's optimize_thresholds)
    m.TEST.TUNE_OUTPUT_THRESH = False
    m.TEST.MASK_THRESH = 0.5  # binarization threshold of mask probabilities
    # keep each mask's largest 8-connected piece (an object in one piece: nuclei, most cells);
    # amodal models: of the whole outline, the visible part kept inside it (visible parts of hidden
    # cells may be split); off in the thesis configs
    m.TEST.ONE_PIECE = False
    # drop masks smaller than this fraction of a disc of INPUT.OBJECT_DIAMETER (model px; after
    # ONE_PIECE): specks and slivers that no object of the trained size is (Cellpose's min_size);
    # 0 = off, as in the thesis configs
    m.TEST.MIN_AREA = 0.0
    # maskness: mean prob over the binary mask ("mask", Mask2Former) or the whole image ("image",
    # eq. 17)
    m.TEST.MASKNESS = "mask"
    # duplicate suppression: none (thesis) | mask (Fast NMS on mask IoU) | matrix (Matrix NMS)
    m.TEST.NMS = "none"
    m.TEST.NMS_THRESH = 0.5  # mask IoU above which "mask" NMS drops the lower-scoring detection
    m.TEST.NMS_SIGMA = 2.0  # Gaussian decay of "matrix" NMS
    m.TEST.NMS_OVERLAP = "iou"  # overlap measure of NMS: iou | ios (intersection over the smaller)
    # test-time augmentation: none | flip (4 views) | dihedral (8: flips and 90-degree rotations),
    # outputs merged query by query (iaunet.modeling.tta); eager PyTorch only
    m.TEST.TTA = "none"
    m.TEST.AUX_PREDICTIONS = False  # also compute every block's prediction at inference (reference)

    # Swin backbone (timm-backed); keys follow Mask2Former's MODEL.SWIN.
    cfg.MODEL.SWIN = CN()
    s = cfg.MODEL.SWIN
    s.PRETRAIN_IMG_SIZE = 224  # image size the pretrained weights were trained at
    s.PATCH_SIZE = 4  # patch embedding stride
    s.EMBED_DIM = 96  # channels of stage 1 (T/S 96, B 128)
    s.DEPTHS = [2, 2, 6, 2]  # blocks per stage (T 2-2-6-2, S/B 2-2-18-2)
    s.NUM_HEADS = [3, 6, 12, 24]  # heads per stage (B: 4-8-16-32)
    s.WINDOW_SIZE = 7  # attention window (B at 384: 12)
    s.MLP_RATIO = 4.0  # MLP expansion
    s.QKV_BIAS = True  # bias on qkv projections
    s.DROP_RATE = 0.0  # dropout
    s.ATTN_DROP_RATE = 0.0  # attention dropout
    s.DROP_PATH_RATE = 0.3  # stochastic depth
    s.APE = False  # absolute position embedding
    s.PATCH_NORM = True  # norm after patch embedding
    s.OUT_FEATURES = ["res2", "res3", "res4", "res5"]  # outputs, strides 4..32
    s.USE_CHECKPOINT = False  # activation checkpointing

    # Input pipeline, thesis §4.2 (augmentation) and image reading (8/16-bit, gray/RGB).
    # detectron2's INPUT.FORMAT is honoured: images are read as RGB and reversed for "BGR".
    cfg.INPUT.FORMAT = "RGB"
    # base resize: "longest_side" -> INPUT.IMAGE_SIZE (thesis) | "scale": by INPUT.PIXEL_SCALE
    cfg.INPUT.RESIZE_MODE = "longest_side"
    # longest side after the base resize; also the training crop size; 0 = from the training set
    # (RESIZE_MODE "scale": ~5 object diameters, iaunet.data.auto_config)
    cfg.INPUT.IMAGE_SIZE = 512
    # image px -> model px; 0 = from the training set at the start of training
    # (iaunet.data.statistics)
    cfg.INPUT.PIXEL_SCALE = 0.0
    # median object diameter in model px; 0 = from the training set ("scale" mode: the target)
    cfg.INPUT.OBJECT_DIAMETER = 0.0
    cfg.INPUT.SCALE_RANGE = (0.8, 1.5)  # random scale jitter after the base resize (training)
    cfg.INPUT.FLIPS = ["horizontal", "vertical"]  # random flips at training time
    cfg.INPUT.ROTATE90 = 0.0  # probability of a random 90/180/270-degree rotation at training time
    # probability of a rotation by any angle at training time (iaunet.data.augmentations)
    cfg.INPUT.ROTATE = 0.0
    # probability of contrast/brightness/gamma, blur and noise jitter of a training crop
    # (iaunet.data.augmentations): other acquisitions of the same objects for a handful of images
    cfg.INPUT.INTENSITY_AUG = 0.0
    # probability that a training sample is a mosaic of 4 crops cut at a random offset (YOLOv4;
    # iaunet.data.mosaic): objects cut anywhere and unrelated content side by side, as in tiles
    cfg.INPUT.MOSAIC = 0.0
    # probability that a training sample gets objects of another crop pasted on it (Ghiasi et al.,
    # CVPR 2021; iaunet.data.mosaic): each object in new surroundings, and occlusions
    cfg.INPUT.COPY_PASTE = 0.0
    # non-8-bit images -> 0..255: "percentile" (per image) | "dtype" (full range of the dtype)
    cfg.INPUT.INTENSITY_NORM = "percentile"
    cfg.INPUT.PERCENTILES = (0.5, 99.5)  # low/high percentiles of the "percentile" rule
    # apply INTENSITY_NORM to 8-bit images too, so that a model sees the same intensities whether an
    # image is stored in 8 or 16 bits (off: 8-bit images are used as they are, as in the thesis)
    cfg.INPUT.NORMALIZE_8BIT = False
    cfg.INPUT.SIZE_DIVISIBILITY = 32  # pad images to a multiple of this
    # which outline a single-mask model learns: "visible" (the annotation's segmentation) |
    # "amodal" (its amodal_segmentation, the whole object; docs/amodal.md)
    cfg.INPUT.MASK_KIND = "visible"
    cfg.INPUT.MIN_INSTANCE_AREA = 1  # instances with fewer pixels after augmentation are dropped
    # the channels of each file the model takes, in this order: indices or the names the file's
    # OME / ImageJ / OME-Zarr metadata gives them, e.g. ("GFP", "DAPI"); each channel normalized on
    # its own. Empty: gray replicated to 3 channels, RGB as is. The input layer has one channel per
    # entry (len(MODEL.PIXEL_MEAN), as in detectron2; 3 equal entries are spread to the count).
    cfg.INPUT.CHANNELS = ()

    # Optimizer, thesis §4.2.
    cfg.SOLVER.OPTIMIZER = "ADAMW"  # ADAMW | SGD
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1  # backbone lr = BASE_LR x this
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0  # weight decay on query embeddings
    # (detectron2's SOLVER.MAX_ITER: 0 = from the number of training images,
    # iaunet.data.auto_config)

    # Memory format of the convolutions: NHWC weights and input (channels_last). Faster on CPU
    # (docs/performance.md); results agree with NCHW to rounding and checkpoints load into either
    # layout.
    cfg.MODEL.CHANNELS_LAST = False

    # Prediction (IAUNetPredictor, iaunet-predict): images are resized by INPUT.PIXEL_SCALE and
    # tiled when larger than a tile (docs/predict.md).
    cfg.TEST.TILE_SIZE = 0  # tile side in model pixels; 0 = INPUT.IMAGE_SIZE
    cfg.TEST.TILE_OVERLAP = 0  # model pixels shared by neighbouring tiles; 0 = half a tile
    cfg.TEST.TILE_BATCH = 4  # tiles per forward call of tiled prediction
