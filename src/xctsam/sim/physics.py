"""Physics-based XCT simulation of label volumes (parallel beam), and the idealised render.

Experimental domain (`XctScanner.scan`), per slice, batched over slices:
1. Source: Kramers' law thick-target bremsstrahlung continuum, photons per keV proportional to
   (kVp - E) / E (H. A. Kramers, Phil. Mag. 46 (1923) 836; characteristic lines omitted),
   hardened by an inherent filtration of the tube (INHERENT_FILTRATION) and by the scanner's
   filter, exp(-mu_filter(E) t).
2. Part: label 1 is the alloy, 3 the inclusion material, 0 (air) and 2 (pore) attenuate nothing
   (air's ~2e-5 /mm at 80 keV is far below anything the detector resolves). Attenuation
   mu_m(E) comes from `materials.linear_attenuation` (xraydb's Elam tables).
3. Projection: each material's path length L_m (mm) along every ray, then Beer-Lambert summed
   over the spectrum, I/I0 = sum_E S(E) exp(-sum_m mu_m(E) L_m) with S normalised. Beam
   hardening (cupping, dark streaks between dense inclusions) follows from this sum; nothing
   is painted on.
4. Detector: an ideal photon counter, Poisson counts at `photons` per unattenuated pixel and
   view; scintillator blur (Gaussian along the detector row, after the quanta are absorbed, so
   the noise is blurred too); a residual per-pixel gain error the flat field did not remove,
   fixed over views (a detector row per slice), which back-projects into rings.
5. -log of the flat-field-normalised reading (clipped at one photon, as scanners do, so photon
   starvation gives its streaks instead of infinities), FBP, divide by the voxel size: 1/mm.

Idealised domain A (`render_ideal`): the monochromatic attenuation map of the same labels at
`render.energy_kev`, noise-free and sharp.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import torch

from xctsam.config.data import IdealRender, Scanner
from xctsam.sim.materials import linear_attenuation
from xctsam.sim.projector import ParallelBeamProjector, projector_for

MATERIAL_LABEL = 1
INCLUSION_LABEL = 3
N_LABELS = 4
# A tube's exit window and the air gap remove the soft end of the spectrum; ~1 mm Al is a
# typical equivalent. Without it a bare Kramers spectrum puts most photons below 10 keV.
INHERENT_FILTRATION: tuple[tuple[str, float], ...] = (("Al", 1.0),)
COUNT_FLOOR = 1.0  # photons: readings below are clipped before the log
# pixels per slice batch (512 slices at 256 px, 32 at 1024 px): peak memory stays below ~1 GB,
# and operators too large to cache are rebuilt once per batch, not once per few slices
_BATCH_PIXELS = 2**25
_RAYS_PER_STEP = 2**14  # rays per spectral-sum step: its exponent table stays in cache


# ---------------------------------------------------------------- source spectrum
@dataclass(frozen=True)
class Spectrum:
    """Photon spectrum on an energy grid: bin centres (keV) and photon fractions summing to 1."""

    energies_kev: np.ndarray
    weights: np.ndarray

    def __post_init__(self) -> None:
        if self.energies_kev.shape != self.weights.shape or self.energies_kev.ndim != 1:
            raise ValueError("energies and weights must be 1-D arrays of the same length")
        total = float(self.weights.sum())
        if not total > 0:
            raise ValueError("spectrum has no photons (filtration too thick?)")
        object.__setattr__(self, "weights", self.weights / total)

    @classmethod
    def monochromatic(cls, energy_kev: float) -> Spectrum:
        return cls(np.array([float(energy_kev)]), np.array([1.0]))

    @property
    def mean_energy_kev(self) -> float:
        return float(self.energies_kev @ self.weights)

    def trimmed(self, relative: float) -> Spectrum:
        """The spectrum without bins holding less than `relative` of the largest bin."""
        keep = self.weights >= relative * self.weights.max()
        return Spectrum(self.energies_kev[keep], self.weights[keep])

    def filtered(self, material: str, thickness_mm: float) -> Spectrum:
        """The spectrum behind `thickness_mm` of `material` (Beer-Lambert per energy)."""
        transmission = np.exp(-linear_attenuation(material, self.energies_kev) * thickness_mm)
        return Spectrum(self.energies_kev, self.weights * transmission)


def kramers_spectrum(kvp: float, energy_step_kev: float) -> Spectrum:
    """Unfiltered bremsstrahlung photon spectrum (Kramers 1923) on bins of `energy_step_kev`."""
    if energy_step_kev >= kvp:
        raise ValueError(
            f"energy step {energy_step_kev} keV must be below the tube voltage {kvp} kV"
        )
    energies = np.arange(energy_step_kev / 2, kvp, energy_step_kev)
    return Spectrum(energies, (kvp - energies) / energies * energy_step_kev)


def scanner_spectrum(scanner: Scanner) -> Spectrum:
    """The spectrum reaching the part: Kramers continuum, inherent then scanner filtration."""
    spectrum = kramers_spectrum(scanner.kvp, scanner.energy_step_kev)
    for material, thickness_mm in (
        *INHERENT_FILTRATION,
        (scanner.filter.material, scanner.filter.thickness_mm),
    ):
        spectrum = spectrum.filtered(material, thickness_mm)
    return spectrum


# ---------------------------------------------------------------- labels
def _check_slices(labels: np.ndarray, size: int | None = None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be (slices, N, N), got shape {labels.shape}")
    if labels.shape[1] != labels.shape[2]:
        raise ValueError(f"slices must be square, got {labels.shape[1]} x {labels.shape[2]}")
    if size is not None and labels.shape[1] != size:
        raise ValueError(
            f"this scanner was built for {size} x {size} slices, got {labels.shape[1]}"
        )
    if labels.size and int(labels.max()) >= N_LABELS:
        raise ValueError(f"label values must be 0..{N_LABELS - 1}, found {int(labels.max())}")
    return labels


def render_ideal(
    labels: np.ndarray, render: IdealRender, alloy: str, inclusion_material: str
) -> np.ndarray:
    """Domain A: each voxel's attenuation (1/mm) at `render.energy_kev`; float32, labels' shape."""
    labels = _check_slices(labels)
    lookup = np.zeros(N_LABELS, dtype=np.float32)
    lookup[MATERIAL_LABEL] = linear_attenuation(alloy, render.energy_kev)[0]
    lookup[INCLUSION_LABEL] = linear_attenuation(inclusion_material, render.energy_kev)[0]
    return lookup[labels]


# ---------------------------------------------------------------- detector
def ring_gains(rng: np.random.Generator, shape: tuple[int, ...], gain_std: float) -> np.ndarray:
    """Relative gain per detector pixel, 1 + N(0, gain_std), kept positive (a pixel that
    reads negative light does not exist; huge `gain_std` would otherwise draw some)."""
    if gain_std == 0:
        return np.ones(shape, dtype=np.float32)
    return np.clip(1 + gain_std * rng.standard_normal(shape), 0.05, None).astype(np.float32)


def detect(
    transmission: np.ndarray,
    photons: float,
    blur_sigma: float,
    gains: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Measured I/I0 (B, views, bins) from the expected one: Poisson, blur, gain, flat field.

    `gains` is (B, bins): one detector row per slice, the same in every view, hence rings.
    """
    counts = rng.poisson(photons * transmission).astype(np.float32)
    if blur_sigma > 0:
        counts = scipy.ndimage.gaussian_filter1d(counts, blur_sigma, axis=-1, mode="nearest")
    counts *= gains[:, None, :]
    return np.maximum(counts, COUNT_FLOOR) / np.float32(photons)


def line_integrals(transmission: np.ndarray) -> np.ndarray:
    """-log(I/I0): the attenuation line integrals FBP inverts."""
    return -np.log(transmission, dtype=np.float32)


# ---------------------------------------------------------------- scanner
class XctScanner:
    """A parallel-beam XCT scanner for one part (alloy, inclusions) at one voxel and slice size."""

    def __init__(
        self,
        scanner: Scanner,
        alloy: str,
        inclusion_material: str,
        voxel_size_mm: float,
        size: int,
        spectrum: Spectrum | None = None,
    ) -> None:
        """`spectrum` overrides the scanner's (e.g. monochromatic, to isolate beam hardening)."""
        if voxel_size_mm <= 0:
            raise ValueError(f"voxel size must be positive, got {voxel_size_mm}")
        self.settings = scanner
        self.alloy = alloy
        self.inclusion_material = inclusion_material
        self.voxel_size_mm = voxel_size_mm
        self.size = size
        self.spectrum = spectrum if spectrum is not None else scanner_spectrum(scanner)
        self.projector: ParallelBeamProjector = projector_for(size, scanner.views)
        # bins the filters leave empty (< 1e-9 of the peak) only cost time in the spectral sum
        used = self.spectrum.trimmed(1e-9)
        materials = (alloy, inclusion_material)  # the order of MATERIAL_LABEL, INCLUSION_LABEL
        mu = np.stack([linear_attenuation(m, used.energies_kev) for m in materials])  # 1/mm
        self._neg_mu = torch.from_numpy(-mu.T.astype(np.float32))  # (energies, materials)
        self._weights = torch.from_numpy(used.weights.astype(np.float32))

    @property
    def batch_slices(self) -> int:
        return max(1, _BATCH_PIXELS // (self.size * self.size))

    def _batches(self, labels: np.ndarray) -> Iterator[slice]:
        step = self.batch_slices
        for start in range(0, labels.shape[0], step):
            yield slice(start, min(start + step, labels.shape[0]))

    def path_lengths(self, labels: np.ndarray) -> np.ndarray:
        """Path length (mm) through alloy and inclusions per ray: (2, slices, views, bins)."""
        maps = np.concatenate([labels == MATERIAL_LABEL, labels == INCLUSION_LABEL]).astype(
            np.float32
        )
        sinograms = self.projector.forward(maps) * np.float32(self.voxel_size_mm)
        return sinograms.reshape(2, labels.shape[0], *sinograms.shape[1:])

    def _transmission_of_paths(self, paths: np.ndarray) -> np.ndarray:
        """sum_E S(E) exp(-sum_m mu_m(E) L_m) for paths (materials, ...) -> (...)."""
        flat = torch.from_numpy(paths.reshape(paths.shape[0], -1))
        n_rays = flat.shape[1]
        out = torch.empty(n_rays)
        # one reused (energies x rays) buffer: a fresh one per step costs page faults, not flops
        buffer = torch.empty(self._neg_mu.shape[0] * min(n_rays, _RAYS_PER_STEP))
        for start in range(0, n_rays, _RAYS_PER_STEP):
            rays = flat[:, start : start + _RAYS_PER_STEP]
            exponents = buffer[: self._neg_mu.shape[0] * rays.shape[1]].view(-1, rays.shape[1])
            torch.matmul(self._neg_mu, rays, out=exponents)
            torch.mv(exponents.exp_().T, self._weights, out=out[start : start + rays.shape[1]])
        return out.reshape(paths.shape[1:]).numpy()

    def expected_transmission(self, labels: np.ndarray) -> np.ndarray:
        """Noise-free I/I0 (slices, views, bins) of label slices."""
        labels = _check_slices(labels, self.size)
        return self._transmission_of_paths(self.path_lengths(labels))

    def reconstruct(self, sinograms: np.ndarray) -> np.ndarray:
        """FBP of -log(I/I0) sinograms -> attenuation (slices, N, N) in 1/mm, float32."""
        return self.projector.fbp(sinograms) / np.float32(self.voxel_size_mm)

    def scan(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Simulated reconstruction (slices, N, N) float32 in 1/mm of uint8 label slices."""
        labels = _check_slices(labels, self.size)
        gains = ring_gains(
            rng, (labels.shape[0], self.projector.n_det), self.settings.ring_gain_std
        )
        image = np.empty(labels.shape, dtype=np.float32)
        for batch in self._batches(labels):
            measured = detect(
                self.expected_transmission(labels[batch]),
                self.settings.photons,
                self.settings.detector_blur,
                gains[batch],
                rng,
            )
            image[batch] = self.reconstruct(line_integrals(measured))
        return image
