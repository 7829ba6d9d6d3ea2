"""XCT data engine: phantoms, physics-based simulation, volume store, import, splits."""
