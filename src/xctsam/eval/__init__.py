"""Evaluation: FID of splits against the training set (fid, fid_backbones); later segmentation metrics.

Submodules are imported by name (`from xctsam.eval.fid import compute_fid`) so that importing the
package does not pull in torch for callers that need none of it.
"""
