"""Segmentation models: SAM construction and checkpoint loading (sam_builder), PEFT adapters.

Submodules are imported by name (`from xctsam.models.sam_builder import build_sam`) so that
importing the package does not pull in torch and segment_anything for callers that need neither.
"""
