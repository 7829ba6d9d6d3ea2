"""The bottom layer: what every other package may use and nothing here may not.

atomic (write-then-rename, one-line write failures), errors (user-facing errors), hashing,
progress (bars and messages on stderr), interrupt (stop signals), device, tracking (MLflow
store and run conventions), compat (torchvision beside CPU torch), optim, finite (diverging
trainings), safe_yaml (params-like YAML), torch_files (weights-only loading), resumable (the
engine every long training runs in).
"""
