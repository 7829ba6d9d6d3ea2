"""The XCT simulator of the embedded default: AM coupon phantoms with defects, their idealised
render and physics scans at scanner settings, per split.

materials.py (alloys, attenuation from xraydb), phantom.py (3-D label phantoms), projector.py
(parallel-beam projection and FBP), physics.py (spectra, noise, rings; the idealised render),
splits.py (phantoms and scans of every split, resumable per volume).
"""
