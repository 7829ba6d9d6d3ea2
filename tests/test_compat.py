"""segment_anything and pytorch_fid import here (CPU torch beside a CUDA torchvision build)."""

from __future__ import annotations

import subprocess
import sys


def test_sam_and_fid_import_in_a_fresh_process() -> None:
    code = (
        "from xctsam.util.compat import ensure_torchvision; ensure_torchvision();"
        "import segment_anything, pytorch_fid.inception, torch;"
        "from segment_anything import sam_model_registry;"
        "print(sorted(sam_model_registry))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "vit_b" in result.stdout


def test_patched_nms_keeps_highest_scoring_of_overlaps() -> None:
    import torch

    from xctsam.util.compat import ensure_torchvision

    ensure_torchvision()
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60.0]])
    scores = torch.tensor([0.8, 0.9, 0.7])
    kept = torch.ops.torchvision.nms(boxes, scores, 0.5)
    assert kept.tolist() == [1, 2]
