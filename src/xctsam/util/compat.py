"""Make torchvision importable beside a CPU-only torch build.

The registry's torchvision 0.28.0 wheel is a CUDA build. Beside the CPU torch 2.13.0 wheel its
C extension does not load, and `import torchvision` then dies in `_meta_registrations` with
`RuntimeError: operator torchvision::nms does not exist`; segment_anything and pytorch_fid
import torchvision, so they die too. When (and only when) that happens, this module defines the
two op schemas torchvision registers fake kernels for (nms, qnms), gives nms a pure-torch CPU
kernel, and imports torchvision again. Where the extension loads (a CUDA machine) it does
nothing. Import it before anything that imports torchvision: `xctsam.util.compat.ensure_torchvision()`.
"""

from __future__ import annotations

import sys

_MISSING_OP = "operator torchvision::nms does not exist"
_library = None  # keeps the torch.library registration alive for the life of the process


def _nms(boxes, scores, iou_threshold: float):
    """Greedy non-maximum suppression (boxes x1, y1, x2, y2): indices kept, by score."""
    import torch

    order = scores.argsort(descending=True)
    boxes = boxes[order]
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas - inter).clamp(min=torch.finfo(boxes.dtype).tiny)
        suppressed |= iou > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def _define_missing_ops() -> None:
    global _library
    import torch

    _library = torch.library.Library("torchvision", "DEF")
    _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library.impl("nms", _nms, "CPU")


def ensure_torchvision() -> bool:
    """Import torchvision, patching the CPU/CUDA mismatch if needed. True if a patch was applied."""
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "ops"):
        return _library is not None
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if _MISSING_OP not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _define_missing_ops()
        import torchvision  # noqa: F401,F811
        return True
    return False
