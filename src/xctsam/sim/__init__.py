"""The XCT simulator of the embedded default: AM coupon phantoms with defects, their idealised
render and physics scans at scanner settings, per split.

materials.py (alloys, attenuation from xraydb), phantom.py (3-D label phantoms: make_phantom,
defect_fractions) built from specimen.py (the coupon's material), defect_shapes.py (pore and
inclusion shape families), defect_placement.py (defects in the specimen's core, to target
fractions) and labels.py (label values), projector.py (parallel-beam projection and FBP),
physics.py (spectra, noise, rings; the idealised render), splits.py (phantoms and scans of every
split, resumable per volume).
"""
