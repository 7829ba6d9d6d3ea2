"""One `Sam` used with prompts, as SAM is: embed an image once, decode many box and point prompts.

`Sam.forward` runs under no_grad, so training calls the three parts here. SAM's decoder takes
one image embedding per call and repeats it for every prompt, so prompts are decoded image
by image, all prompts of an image in one call. Box and single-point prompts both give two
sparse tokens (a point is padded with SAM's "not a point" token), so both kinds share the call.

Outputs follow SAM's convention: mask token 0 is the single-mask output (what a box, an
unambiguous prompt, is trained and read on); tokens 1..3 are the multimask outputs (what an
ambiguous single point is trained on, the best of the three; read by the predicted IoU).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from xctsam.models.sam_builder import Sam
from xctsam.models.sam_peft import sam_input

SINGLE = 0  # the single-mask token
MULTI = slice(1, 4)  # the three multimask tokens


def embed_images(sam: Sam, images: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) grey in [0, 1] -> (B, 256, S/16, S/16) image embeddings."""
    return sam.image_encoder(sam_input(sam, images))


def decode(
    sam: Sam, embedding: torch.Tensor, boxes: np.ndarray | torch.Tensor, points: np.ndarray | torch.Tensor, size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask logits (N, 4, size, size) and predicted IoUs (N, 4), boxes first, then points.

    embedding: (1, C, g, g) of one image; boxes (Nb, 4) x0 y0 x1 y1 and points (Np, 2) x y, in
    pixels of the S x S input. size: of the returned logits, default S (training scores them
    at S / 2, where the loss costs a quarter and objects of a dozen pixels still show).
    """
    device = embedding.device
    encoder = sam.prompt_encoder
    sparse, dense = [], []
    if len(boxes):
        boxes_t = torch.as_tensor(boxes, dtype=torch.float32, device=device)
        s, d = encoder(points=None, boxes=boxes_t, masks=None)
        sparse.append(s)
        dense.append(d)
    if len(points):
        coords = torch.as_tensor(points, dtype=torch.float32, device=device)[:, None, :]
        labels = torch.ones(coords.shape[:2], dtype=torch.int64, device=device)  # positive points
        s, d = encoder(points=(coords, labels), boxes=None, masks=None)
        sparse.append(s)
        dense.append(d)
    if not sparse:
        raise ValueError("decode needs at least one box or point prompt")
    low_res, iou = sam.mask_decoder.predict_masks(
        image_embeddings=embedding,
        image_pe=encoder.get_dense_pe(),
        sparse_prompt_embeddings=torch.cat(sparse),
        dense_prompt_embeddings=torch.cat(dense),
    )
    size = size or sam.image_encoder.img_size
    return F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False), iou


def read_masks(logits: torch.Tensor, iou: torch.Tensor, boxes: int) -> torch.Tensor:
    """(N, S, S) bool answers: the single mask for the first `boxes` prompts, for the points the
    multimask output with the highest predicted IoU (SAM's own choice at inference)."""
    best = iou[:, MULTI].argmax(dim=1) + MULTI.start
    chosen = torch.where(torch.arange(len(iou), device=iou.device) < boxes, SINGLE, best)
    return logits[torch.arange(len(logits), device=logits.device), chosen] > 0
