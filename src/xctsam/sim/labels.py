"""Label values of a phantom: the study's classes (xctsam.CLASS_NAMES), in their order."""

BACKGROUND, MATERIAL, PORE, INCLUSION = 0, 1, 2, 3
