"""A stand-in SAM foundation for the embedded default: promptable pretraining of the small SAM.

Official SAM checkpoints exist only for vit_b / vit_l / vit_h. The CPU-sized `small` variant
gets a foundation of its own here, trained the way SAM was (point and box prompts, several
mask outputs, focal + Dice + IoU-prediction losses) on a generic, non-XCT shapes corpus, so
Conv-LoRA adapts a model that already segments instead of a random encoder.
"""
