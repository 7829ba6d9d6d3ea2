"""xctsam: Segment Anything with Conv-LoRA for industrial X-ray CT of AM metal parts."""

__version__ = "0.1.0"

# Label values shared by every stage (README, data contract).
CLASS_NAMES: tuple[str, ...] = ("background", "material", "pore", "inclusion")
NUM_CLASSES = len(CLASS_NAMES)
