"""The IAUNet meta-architecture: normalize/pad -> backbone -> U-Net pixel decoder -> query
decoder."""

import math
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import BitMasks, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from .modeling.criterion import SetCriterion
from .modeling.dense_supervision import DenseHead
from .modeling.matcher import HungarianMatcher
from .modeling.pixel_decoder import UNetPixelDecoder
from .modeling.postprocessing import PostProcessing, instances_from_topk, topk_predictions
from .modeling.transformer_decoder import QueryDecoder
from .modeling.tta import VIEWS, predict_views


@META_ARCH_REGISTRY.register()
class IAUNet(nn.Module):
    """Instance-Aware U-Net. Training returns a loss dict; inference returns ``[{"instances":
    Instances}]``."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        pixel_decoder: UNetPixelDecoder,
        query_decoder: QueryDecoder,
        criterion: SetCriterion,
        num_classes: int,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
        size_divisibility: int,
        deep_supervision: bool,
        postprocessing: PostProcessing,
        channels_last: bool = False,
        dense_head: Optional[DenseHead] = None,
        test_augmentation: str = "none",
    ):
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.query_decoder = query_decoder
        self.criterion = criterion
        self.dense_head = dense_head  # training aid only (MODEL.IAUNET.DENSE_WEIGHT)
        self.num_classes = num_classes
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.size_divisibility = max(size_divisibility, backbone.size_divisibility)
        self.deep_supervision = deep_supervision
        self.postprocessing = postprocessing  # inference settings (MODEL.IAUNET.TEST.*)
        if test_augmentation not in VIEWS:
            raise ValueError(
                f"MODEL.IAUNET.TEST.TTA must be one of {tuple(VIEWS)}, got {test_augmentation!r}"
            )
        self.test_augmentation = test_augmentation  # views merged at inference (TEST.TTA)
        self.mask_stride = pixel_decoder.mask_stride  # E and the mask logits: 1/4 or 1/2
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.to(
                memory_format=torch.channels_last
            )  # 4-D weights; checkpoints load into them unchanged

    @classmethod
    def from_config(cls, cfg):
        m = cfg.MODEL.IAUNET
        if len(cfg.MODEL.PIXEL_MEAN) != len(cfg.MODEL.PIXEL_STD):
            raise ValueError("MODEL.PIXEL_MEAN and MODEL.PIXEL_STD must have the same length")
        for key in ("CLASS_WEIGHT", "MASK_WEIGHT", "DICE_WEIGHT", "NO_OBJECT_WEIGHT"):
            # A NaN/inf weight would surface later as a "diverged training" error of the matcher.
            if not (math.isfinite(m[key]) and m[key] >= 0):
                raise ValueError(f"MODEL.IAUNET.{key} must be a finite number >= 0, got {m[key]}")
        if cfg.MODEL.BACKBONE.NAME not in BACKBONE_REGISTRY:
            raise KeyError(
                f"MODEL.BACKBONE.NAME {cfg.MODEL.BACKBONE.NAME!r} is not a registered backbone; "
                f"registered: {sorted(name for name, _ in BACKBONE_REGISTRY)}"
            )
        backbone = build_backbone(cfg)
        missing = [f for f in m.IN_FEATURES if f not in backbone.output_shape()]
        if missing:
            raise ValueError(
                f"MODEL.IAUNET.IN_FEATURES {missing} are not outputs of backbone "
                f"{cfg.MODEL.BACKBONE.NAME} "
                f"(it has {list(backbone.output_shape())})"
            )
        pixel_decoder = UNetPixelDecoder(cfg, backbone.output_shape())
        query_decoder = QueryDecoder(
            cfg, num_levels=pixel_decoder.num_levels, in_channels=pixel_decoder.out_channels
        )
        matcher = HungarianMatcher(m.CLASS_WEIGHT, m.MASK_WEIGHT, m.DICE_WEIGHT, m.TRAIN_NUM_POINTS)
        criterion = SetCriterion(
            m.NUM_CLASSES,
            matcher,
            class_weight=m.CLASS_WEIGHT,
            mask_weight=m.MASK_WEIGHT,
            dice_weight=m.DICE_WEIGHT,
            no_object_weight=m.NO_OBJECT_WEIGHT,
            point_sampling=m.LOSS_POINT_SAMPLING,
            num_points=m.TRAIN_NUM_POINTS,
            oversample_ratio=m.OVERSAMPLE_RATIO,
            importance_sample_ratio=m.IMPORTANCE_SAMPLE_RATIO,
            dense_weight=m.DENSE_WEIGHT,
        )
        if m.DENSE_WEIGHT < 0:
            raise ValueError(f"MODEL.IAUNET.DENSE_WEIGHT must be >= 0, got {m.DENSE_WEIGHT}")
        return {
            "backbone": backbone,
            "pixel_decoder": pixel_decoder,
            "query_decoder": query_decoder,
            "criterion": criterion,
            "num_classes": m.NUM_CLASSES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "deep_supervision": m.DEEP_SUPERVISION,
            "postprocessing": PostProcessing.from_config(cfg),
            "channels_last": cfg.MODEL.CHANNELS_LAST,
            "dense_head": DenseHead(m.MASK_DIM) if m.DENSE_WEIGHT > 0 else None,
            "test_augmentation": m.TEST.TTA,
        }

    @property
    def num_queries(self) -> int:
        return self.query_decoder.queries.num_embeddings

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalize (C, H, W) images with pixel mean/std and pad the batch to
        ``size_divisibility``."""
        images = []
        for x in batched_inputs:
            img = x["image"].to(self.device, non_blocking=True)
            if img.dim() != 3 or img.shape[0] != self.pixel_mean.shape[0]:
                raise ValueError(
                    f"expected a ({self.pixel_mean.shape[0]}, H, W) image tensor, got shape "
                    f"{tuple(img.shape)} "
                    f"for {x.get('file_name', 'an input')}"
                )
            images.append((img.float() - self.pixel_mean) / self.pixel_std)
        images = ImageList.from_tensors(images, self.size_divisibility)
        images.tensor = images.tensor.contiguous(memory_format=self.memory_format)
        return images

    def forward_network(
        self,
        images: torch.Tensor,
        deep_supervision: bool = False,
        targets: Optional[List[Dict[str, torch.Tensor]]] = None,
    ) -> Dict:
        """The network, without pre- and post-processing: what training, inference and the tools
        run.

        Args:
            images: (B, 3, H, W) normalized images, H and W multiples of ``size_divisibility``.
            deep_supervision: also return every decoder block's prediction as ``aux_outputs``.
            targets: training targets (``prepare_targets``), for the denoising queries.
        Returns:
            {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H/s, W/s), "aux_outputs": [...]}
            (and "pred_amodal_masks" (B, Q, H/s, W/s), the whole outlines, with
            ``MODEL.IAUNET.AMODAL``) with s = ``mask_stride`` (``QueryDecoder.forward``); in
            training with a dense probe
            also "dense_logits" (B, 2, H/s, W/s) (:mod:`iaunet.modeling.dense_supervision`).
        """
        features = self.backbone(images)
        mask_features, multi_scale_features = self.pixel_decoder(features, images)
        outputs = self.query_decoder(
            multi_scale_features, mask_features, deep_supervision=deep_supervision, targets=targets
        )
        if self.training and self.dense_head is not None:
            outputs["dense_logits"] = self.dense_head(mask_features)
        return outputs

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: detectron2 format: "image" (C, H, W) on the 0..255 scale; for training
                "instances" with gt_masks (BitMasks) and gt_classes; optional "height"/"width" of
                the output.
        Returns:
            training: a dict of weighted losses; inference: ``[{"instances": Instances}]`` per
            image.
        """
        images = self.preprocess_image(batched_inputs)
        if self.training:
            if any("instances" not in x for x in batched_inputs):
                raise ValueError(
                    "training inputs need 'instances' (use IAUNetDatasetMapper(cfg, is_train=True))"
                )
            targets = self.prepare_targets(
                [x["instances"].to(self.device) for x in batched_inputs], images
            )
            outputs = self.forward_network(images.tensor, self.deep_supervision, targets)
            try:
                losses = self.criterion(outputs, targets)
            except FloatingPointError as e:  # from the matcher: add where it happened
                raise FloatingPointError(f"{e} ({_batch_note(batched_inputs)})") from None
            check_losses_finite(losses, batched_inputs)
            return losses
        outputs = predict_views(
            lambda x: self.forward_network(x.contiguous(memory_format=self.memory_format)),
            images.tensor,
            self.test_augmentation,
        )
        results = []
        with torch.profiler.record_function("iaunet::instance_inference"):  # a range in profiles
            for i, x in enumerate(batched_inputs):
                height = x.get("height", images.image_sizes[i][0])
                width = x.get("width", images.image_sizes[i][1])
                amodal = outputs.get("pred_amodal_masks")
                instances = self.instance_inference(
                    outputs["pred_logits"][i],
                    outputs["pred_masks"][i],
                    images.image_sizes[i],
                    (height, width),
                    amodal_masks=None if amodal is None else amodal[i],
                )
                results.append({"instances": instances})
        return results

    @staticmethod
    def prepare_targets(
        instances: List[Instances], images: ImageList
    ) -> List[Dict[str, torch.Tensor]]:
        """gt_masks (T, h, w) zero-padded to the batch's padded size (T, H, W): "masks", and
        "amodal_masks" from gt_amodal_masks (the whole outlines) when the instances have them."""
        h_pad, w_pad = images.tensor.shape[-2:]
        targets = []
        for inst in instances:
            target = {"labels": inst.gt_classes.long()}
            for field, key in (("gt_masks", "masks"), ("gt_amodal_masks", "amodal_masks")):
                if not inst.has(field):
                    continue
                masks = inst.get(field)
                masks = masks.tensor if isinstance(masks, BitMasks) else masks
                padded = masks.new_zeros((masks.shape[0], h_pad, w_pad))
                padded[:, : masks.shape[1], : masks.shape[2]] = masks
                target[key] = padded
            targets.append(target)
        return targets

    @torch.no_grad()
    def instance_inference(
        self,
        logits: torch.Tensor,
        masks: torch.Tensor,
        image_size: Tuple[int, int],
        output_size: Tuple[int, int],
        amodal_masks: Optional[torch.Tensor] = None,
    ) -> Instances:
        """
        Args:
            logits: (Q, K+1); masks: (Q, h, w) logits at 1/``mask_stride`` of the padded input.
            image_size: (H, W) of the input before padding; output_size: (H0, W0) to resize to.
            amodal_masks: (Q, h, w) whole-outline logits (``MODEL.IAUNET.AMODAL``).
        Returns:
            Instances of size output_size with pred_masks (bool), scores, pred_classes, pred_boxes,
            by decreasing score (:mod:`iaunet.modeling.postprocessing`); with ``amodal_masks``
            also pred_amodal_masks (bool), pred_masks being the visible parts inside them.
        """
        scores, labels, mask_logits, *amodal = self.topk_predictions(
            logits, masks, image_size, amodal_masks
        )
        return instances_from_topk(
            scores,
            labels,
            mask_logits,
            image_size,
            output_size,
            self.postprocessing,
            stride=self.mask_stride,
            amodal_mask_logits=amodal[0] if amodal else None,
        )

    def topk_predictions(
        self,
        logits: torch.Tensor,
        masks: torch.Tensor,
        image_size: Tuple[int, int],
        amodal_masks: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, ...]:
        """The fixed-size part of post-processing (exportable): see
        ``postprocessing.topk_predictions``."""
        k = min(self.postprocessing.detections_per_image, self.num_queries * self.num_classes)
        return topk_predictions(
            logits,
            masks,
            image_size,
            self.postprocessing,
            num_classes=self.num_classes,
            k=k,
            stride=self.mask_stride,
            amodal_masks=amodal_masks,
        )


def _batch_note(batched_inputs: List[Dict]) -> str:
    """Where a batch failed, for error messages: the iteration (inside a trainer) and the image
    files."""
    files = ", ".join(str(x.get("file_name", "?")) for x in batched_inputs)
    try:
        return f"at iteration {get_event_storage().iter}, images {files}"
    except AssertionError:  # no EventStorage: called outside a detectron2 trainer
        return f"images {files}"


def check_losses_finite(losses: Dict[str, torch.Tensor], batched_inputs: List[Dict]) -> None:
    """Raise ``FloatingPointError`` naming the first NaN/inf loss term, the iteration and the
    images.

    detectron2's trainer only reports the whole loss dict, after the backward pass. One device sync
    per step: all terms are checked together.
    """
    finite = torch.stack([v.detach().float() for v in losses.values()]).isfinite()
    if bool(finite.all()):
        return
    bad = [k for k, ok in zip(losses, finite.tolist()) if not ok]
    raise FloatingPointError(
        f"loss {bad[0]} = {losses[bad[0]].item()} is not finite ({_batch_note(batched_inputs)}); "
        "non-finite terms: "
        f"{bad}. Training diverged or an input is broken: lower SOLVER.BASE_LR, enable "
        "SOLVER.CLIP_GRADIENTS, "
        "or check these images."
    )
