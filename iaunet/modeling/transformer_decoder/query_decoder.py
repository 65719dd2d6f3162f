"""Query decoder with per-block prediction heads (thesis §3.5)."""

import math
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from torch import Tensor, nn

from .layers import AttentionLayer, FFNLayer, sine_position_encoding
from .training_queries import MaskDenoising, QueryGroups, self_attention_mask

DECODER_ORDERS = ("seq", "round_robin")


class QueryDecoder(nn.Module):
    """N learnable queries refined by cross-attention to the pixel decoder's multi-scale features
    X_m (thesis §3.5).

    Each block is cross-attention -> self-attention -> FFN. With ``order="seq"`` all blocks of 1/32
    run first, then 1/16, then 1/8; ``"round_robin"`` cycles over the levels block by block. A
    shared head (LayerNorm -> class Linear / mask-embedding Linear) predicts after every block; the
    last block's prediction is the output, the others are auxiliary outputs for deep supervision.

    Training only, opt-in (:mod:`.training_queries`): extra query groups (one-to-many assignment)
    and denoising queries built from the targets.
    """

    @configurable
    def __init__(
        self,
        *,
        num_levels: int,
        in_channels: int,
        num_classes: int,
        num_queries: int,
        hidden_dim: int,
        mask_dim: int,
        nheads: int,
        dim_feedforward: int,
        dropout: float,
        pre_norm: bool,
        blocks_per_level: int,
        order: str,
        aux_predictions_at_test: bool,
        query_groups: int = 1,
        denoising: Optional[MaskDenoising] = None,
        amodal: bool = False,
    ):
        super().__init__()
        if order not in DECODER_ORDERS:
            raise ValueError(
                f"MODEL.IAUNET.DECODER_ORDER must be one of {DECODER_ORDERS}, got {order!r}"
            )
        if hidden_dim % nheads:
            raise ValueError(
                f"MODEL.IAUNET.HIDDEN_DIM ({hidden_dim}) must be divisible by NHEADS ({nheads})"
            )
        if blocks_per_level < 1:
            raise ValueError(f"MODEL.IAUNET.BLOCKS_PER_LEVEL must be >= 1, got {blocks_per_level}")
        if query_groups < 1:
            raise ValueError(f"MODEL.IAUNET.TRAIN.QUERY_GROUPS must be >= 1, got {query_groups}")
        self.memory_proj = (
            nn.Linear(in_channels, hidden_dim) if in_channels != hidden_dim else nn.Identity()
        )
        num_blocks = num_levels * blocks_per_level
        if order == "seq":
            self.block_levels = [lvl for lvl in range(num_levels) for _ in range(blocks_per_level)]
        else:
            self.block_levels = [lvl for _ in range(blocks_per_level) for lvl in range(num_levels)]
        self.cross_attention = nn.ModuleList(
            [AttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(num_blocks)]
        )
        self.self_attention = nn.ModuleList(
            [AttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(num_blocks)]
        )
        self.ffn = nn.ModuleList(
            [FFNLayer(hidden_dim, dim_feedforward, dropout, pre_norm) for _ in range(num_blocks)]
        )
        self.queries = nn.Embedding(num_queries, hidden_dim)
        self.query_pos = nn.Embedding(num_queries, hidden_dim)
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)  # "no object" is the last class
        self.mask_embed = nn.Linear(hidden_dim, mask_dim)
        # MODEL.IAUNET.AMODAL: the same head built twice, the second for the whole outline
        self.amodal_mask_embed = nn.Linear(hidden_dim, mask_dim) if amodal else None
        prior = 0.01
        nn.init.normal_(self.class_embed.weight, std=0.01)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior) / prior))
        for head in (self.mask_embed, self.amodal_mask_embed):
            if head is not None:
                nn.init.normal_(head.weight, std=0.01)
                nn.init.constant_(head.bias, 0.0)
        self.aux_predictions_at_test = aux_predictions_at_test
        self.nheads = nheads
        self.groups = (
            QueryGroups(query_groups, num_queries, hidden_dim) if query_groups > 1 else None
        )
        self.denoising = denoising

    @classmethod
    def from_config(cls, cfg, num_levels: int, in_channels: int):
        m = cfg.MODEL.IAUNET
        return {
            "num_levels": num_levels,
            "in_channels": in_channels,
            "num_classes": m.NUM_CLASSES,
            "num_queries": m.NUM_QUERIES,
            "hidden_dim": m.HIDDEN_DIM,
            "mask_dim": m.MASK_DIM,
            "nheads": m.NHEADS,
            "dim_feedforward": m.DIM_FEEDFORWARD,
            "dropout": m.DROPOUT,
            "pre_norm": m.PRE_NORM,
            "blocks_per_level": m.BLOCKS_PER_LEVEL,
            "order": m.DECODER_ORDER,
            "aux_predictions_at_test": m.TEST.AUX_PREDICTIONS,
            "query_groups": m.TRAIN.QUERY_GROUPS,
            "denoising": MaskDenoising(
                m.NUM_CLASSES,
                m.HIDDEN_DIM,
                m.MASK_DIM,
                groups=m.TRAIN.DENOISING_GROUPS,
                max_queries=m.TRAIN.DENOISING_MAX_QUERIES,
                box_noise=m.TRAIN.DENOISING_BOX_NOISE,
                label_noise=m.TRAIN.DENOISING_LABEL_NOISE,
            )
            if m.TRAIN.DENOISING
            else None,
            "amodal": m.AMODAL,
        }

    def predict(self, queries: torch.Tensor, mask_features: torch.Tensor) -> Dict[str, Tensor]:
        """queries (B, Q, D), E (B, C, h, w) -> {"pred_logits": (B, Q, K+1), "pred_masks": mask
        logits (B, Q, h, w)}, with ``amodal`` also "pred_amodal_masks" (B, Q, h, w), the whole
        outlines from the same E; h, w: H/4, W/4 (or H/2, W/2 with MASK_STRIDE 2)."""
        q = self.decoder_norm(queries)
        out = {
            "pred_logits": self.class_embed(q),
            "pred_masks": torch.einsum("bqc,bchw->bqhw", self.mask_embed(q), mask_features),
        }
        if self.amodal_mask_embed is not None:
            out["pred_amodal_masks"] = torch.einsum(
                "bqc,bchw->bqhw", self.amodal_mask_embed(q), mask_features
            )
        return out

    def forward(
        self,
        multi_scale_features: List[torch.Tensor],
        mask_features: torch.Tensor,
        deep_supervision: bool = True,
        targets: Optional[List[Dict[str, torch.Tensor]]] = None,
    ) -> Dict:
        """
        Args:
            multi_scale_features: X_m per level, coarse to fine, each (B, C, H_l, W_l); never
            updated. mask_features: E, (B, MASK_DIM, h, w), at 1/MASK_STRIDE.
            deep_supervision: return every block's prediction as ``aux_outputs`` (training).
            targets: per image "labels" and "masks" (training, for the denoising queries).
        Returns:
            {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, h, w), "aux_outputs": [...]}
            (and "pred_amodal_masks" (B, Q, h, w) with ``amodal``);
            Q = N at inference and G * N in training with query groups, "query_groups": G. With
            denoising queries in training, "denoising": the same for them plus their "indices".
        """
        b = mask_features.shape[0]
        memory = [
            self.memory_proj(m.flatten(2).transpose(1, 2)) for m in multi_scale_features
        ]  # (B, H_l*W_l, D)
        pos = [
            sine_position_encoding(m, x.shape[-1]) for m, x in zip(multi_scale_features, memory)
        ]  # (1, H_l*W_l, D)
        x = self.queries.weight.unsqueeze(0).expand(b, -1, -1)
        query_pos = self.query_pos.weight.unsqueeze(0).expand(b, -1, -1)
        groups = self.groups.num_groups if self.training and self.groups is not None else 1
        dn = None
        if self.training and self.denoising is not None and targets is not None:
            dn = self.denoising(targets, mask_features)
        attn_mask = None
        if groups > 1 or dn is not None:
            parts, pos_parts = [x], [query_pos]
            if groups > 1:
                parts.append(self.groups.queries.weight.unsqueeze(0).expand(b, -1, -1))
                pos_parts.append(self.groups.query_pos.weight.unsqueeze(0).expand(b, -1, -1))
            if dn is not None:
                parts.append(dn["queries"])
                pos_parts.append(dn["query_pos"])
            x, query_pos = torch.cat(parts, 1), torch.cat(pos_parts, 1)
            attn_mask, _ = self_attention_mask(
                b, self.queries.num_embeddings, groups, dn, self.nheads
            )
            attn_mask = attn_mask.to(x.device)
        all_aux = deep_supervision or (not self.training and self.aux_predictions_at_test)
        predictions = []
        for i, lvl in enumerate(self.block_levels):
            x = self.cross_attention[i](x, memory[lvl], query_pos=query_pos, pos=pos[lvl])
            x = self.self_attention[i](
                x, x, query_pos=query_pos, pos=query_pos, attn_mask=attn_mask
            )
            x = self.ffn[i](x)
            if all_aux or i == len(self.block_levels) - 1:
                predictions.append(self.predict(x, mask_features))
        num_matching = groups * self.queries.num_embeddings
        outputs = _outputs(predictions, 0, num_matching, deep_supervision)
        outputs["query_groups"] = groups
        if dn is not None:
            outputs["denoising"] = _outputs(predictions, num_matching, None, deep_supervision)
            outputs["denoising"]["indices"] = dn["indices"]
        return outputs


def _outputs(predictions: List[Dict], start: int, end: Optional[int], aux: bool) -> Dict:
    """The predictions of queries ``start:end`` as {"pred_logits", "pred_masks"[,
    "pred_amodal_masks"], "aux_outputs"}."""
    sliced = [{k: v[:, start:end] for k, v in p.items()} for p in predictions]
    out = dict(sliced[-1])
    out["aux_outputs"] = sliced[:-1] if aux else []
    return out
