"""Materials of AM metal parts and their energy-dependent X-ray attenuation.

Attenuation comes from xraydb's tabulated mass attenuation coefficients (Elam, Ravel and
Sieber, Radiat. Phys. Chem. 63 (2002) 121, the tables xraydb ships), mixed by mass fraction:
mu(E) = rho * sum_i w_i (mu/rho)_i(E). Compositions are nominal:
AFA steel after Yamamoto et al., Science 316 (2007) 433 (Fe-20Ni-14Cr-2.5Al-Mn-Nb);
316L after ASTM A240; Ti-6Al-4V after ASTM F2924. Densities are handbook values.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Material:
    name: str
    density_g_cm3: float
    mass_fractions: tuple[tuple[str, float], ...]  # (element symbol, mass fraction)


MATERIALS: dict[str, Material] = {
    m.name: m
    for m in (
        Material("steel", 7.80, (("Fe", 0.595), ("Ni", 0.20), ("Cr", 0.14), ("Al", 0.035), ("Mn", 0.02), ("Nb", 0.01))),
        Material("316L", 8.00, (("Fe", 0.655), ("Cr", 0.17), ("Ni", 0.12), ("Mo", 0.025), ("Mn", 0.02), ("Si", 0.01))),
        Material("Ti64", 4.43, (("Ti", 0.90), ("Al", 0.06), ("V", 0.04))),
        Material("Ni", 8.908, (("Ni", 1.0),)),
        Material("W", 19.25, (("W", 1.0),)),
        Material("Cu", 8.96, (("Cu", 1.0),)),
        Material("Al", 2.70, (("Al", 1.0),)),
    )
}


@lru_cache(maxsize=64)
def _mu_per_mm(name: str, energies_kev: tuple[float, ...]) -> np.ndarray:
    import xraydb  # imported here: its tables load on first use, not at CLI start

    material = MATERIALS[name]
    energies_ev = np.asarray(energies_kev, dtype=np.float64) * 1e3
    mass_mu = sum(weight * np.asarray(xraydb.mu_elam(symbol, energies_ev)) for symbol, weight in material.mass_fractions)
    return (material.density_g_cm3 * mass_mu / 10.0).astype(np.float64)  # 1/cm -> 1/mm


def linear_attenuation(name: str, energies_kev: np.ndarray | float) -> np.ndarray:
    """Linear attenuation coefficient in 1/mm of material `name` at each energy (keV)."""
    energies = np.atleast_1d(np.asarray(energies_kev, dtype=np.float64))
    return _mu_per_mm(name, tuple(energies.tolist())).copy()
