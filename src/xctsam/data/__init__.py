"""The volume store and what reads it: HDF5 volumes and manifests, importers of real scans, checks, ML data loading (slices, windows, tiles)."""
