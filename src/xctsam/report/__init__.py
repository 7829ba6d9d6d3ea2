"""The study report: `reports/study.md` and a self-contained `reports/study.html`.

Sections, in the study's order: the distance (FID, KID, beside their floor) of each test split
to the training set, ordering the splits by how far out of distribution they are; IoU per class
per split of SAM-GAN against the U-Net with bootstrap intervals and their paired difference (and
any zero-shot baselines of metrics/zero_shot/); the GAN ablation (trained on Tr-GAN vs Tr-sim);
the forgetting deltas of the re-fine-tuned variants and their in- × out-of-domain matrix;
per-defect detection (with recall by size); IoU against KID; the robustness plots; and overlays
(input / truth / each model) for two slices of the first volume of every test split.

Both files are rendered from one list of `Section`s so the two can never disagree. A stage
that has not run yet (its JSON is missing) gives a section saying "not run yet" instead of an
error: the report can be written at any point of the pipeline.

One job per module: inputs (the metric files it reads), cells (numbers, intervals and "n.s." as
text), tables, notes (the text under each section), figures, overlays, render (markdown and HTML
from the sections) and stage (the sections and `write_report`, which the CLI calls).
Submodules are imported by name (`from xctsam.report.stage import write_report`).
"""
