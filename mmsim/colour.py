"""Colour science for checking the palette: sRGB to CIELAB, CIEDE2000 and colour-vision deficiency.

Pure numpy, no dependencies. ``lab(hex)`` converts an sRGB colour (D65 white);
``ciede2000(lab1, lab2)`` is the perceptual distance of Sharma, Wu and Dalal
(2005), the one the CIE recommends (about 2.3 is a just-noticeable difference;
categorical colours need far more). ``simulate(hex, kind)`` shows a colour as
a person with protanopia, deuteranopia or tritanopia sees it (the full-severity
matrices of Machado, Oliveira and Fernandes, 2009, applied in linear RGB).
``min_distance(colours, kind)`` is the smallest CIEDE2000 distance between any
two of them as seen with ``kind`` (None: normal vision); the palette's test
and ``python -m mmsim.colour`` use it.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterable

import numpy as np

# Machado, Oliveira, Fernandes (2009), "A physiologically-based model for simulation of color vision
# deficiency", severity 1.0; applied to linear RGB.
CVD = {
    "protanopia": np.array([[0.152286, 1.052583, -0.204868],
                            [0.114503, 0.786281, 0.099216],
                            [-0.003882, -0.048116, 1.051998]]),
    "deuteranopia": np.array([[0.367322, 0.860646, -0.227968],
                              [0.280085, 0.672501, 0.047413],
                              [-0.011820, 0.042940, 0.968881]]),
    "tritanopia": np.array([[1.255528, -0.076749, -0.178779],
                            [-0.078411, 0.930809, 0.147602],
                            [0.004733, 0.691367, 0.303900]]),
}
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
_WHITE = np.array([0.95047, 1.0, 1.08883])  # D65


def rgb(hex_colour: str) -> np.ndarray:
    """'#RRGGBB' -> sRGB in 0..1."""
    h = hex_colour.lstrip("#")
    if len(h) != 6:
        raise ValueError(f"not a #RRGGBB colour: {hex_colour!r}")
    return np.array([int(h[i:i + 2], 16) / 255.0 for i in (0, 2, 4)])


def _linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _gamma(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.0031308, 12.92 * c, 1.055 * c ** (1 / 2.4) - 0.055)


def simulate(hex_colour: str, kind: str | None) -> np.ndarray:
    """The sRGB colour (0..1) as seen with ``kind`` of colour-vision deficiency (None: unchanged)."""
    c = rgb(hex_colour)
    if kind is None:
        return c
    return _gamma(CVD[kind] @ _linear(c))


def lab_of_rgb(c: np.ndarray) -> np.ndarray:
    xyz = _RGB_TO_XYZ @ _linear(np.asarray(c, dtype=float)) / _WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def lab(hex_colour: str, kind: str | None = None) -> np.ndarray:
    """CIELAB (D65) of a '#RRGGBB' colour, as seen with ``kind`` of colour-vision deficiency."""
    return lab_of_rgb(simulate(hex_colour, kind))


def ciede2000(lab1: Iterable[float], lab2: Iterable[float]) -> float:
    """The CIEDE2000 colour difference (kL = kC = kH = 1)."""
    L1, a1, b1 = (float(x) for x in lab1)
    L2, a2, b2 = (float(x) for x in lab2)
    c1, c2 = math.hypot(a1, b1), math.hypot(a2, b2)
    cbar = (c1 + c2) / 2
    g = 0.5 * (1 - math.sqrt(cbar ** 7 / (cbar ** 7 + 25 ** 7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = math.hypot(a1p, b1), math.hypot(a2p, b2)
    h1p = math.degrees(math.atan2(b1, a1p)) % 360 if c1p else 0.0
    h2p = math.degrees(math.atan2(b2, a2p)) % 360 if c2p else 0.0
    dL = L2 - L1
    dC = c2p - c1p
    if c1p * c2p == 0:
        dh = 0.0
    elif abs(h2p - h1p) <= 180:
        dh = h2p - h1p
    elif h2p - h1p > 180:
        dh = h2p - h1p - 360
    else:
        dh = h2p - h1p + 360
    dH = 2 * math.sqrt(c1p * c2p) * math.sin(math.radians(dh / 2))
    Lbar = (L1 + L2) / 2
    cbarp = (c1p + c2p) / 2
    if c1p * c2p == 0:
        hbar = h1p + h2p
    elif abs(h1p - h2p) <= 180:
        hbar = (h1p + h2p) / 2
    elif h1p + h2p < 360:
        hbar = (h1p + h2p + 360) / 2
    else:
        hbar = (h1p + h2p - 360) / 2
    t = (1 - 0.17 * math.cos(math.radians(hbar - 30)) + 0.24 * math.cos(math.radians(2 * hbar))
         + 0.32 * math.cos(math.radians(3 * hbar + 6)) - 0.20 * math.cos(math.radians(4 * hbar - 63)))
    dtheta = 30 * math.exp(-(((hbar - 275) / 25) ** 2))
    rc = 2 * math.sqrt(cbarp ** 7 / (cbarp ** 7 + 25 ** 7))
    sl = 1 + 0.015 * (Lbar - 50) ** 2 / math.sqrt(20 + (Lbar - 50) ** 2)
    sc = 1 + 0.045 * cbarp
    sh = 1 + 0.015 * cbarp * t
    rt = -math.sin(math.radians(2 * dtheta)) * rc
    return math.sqrt((dL / sl) ** 2 + (dC / sc) ** 2 + (dH / sh) ** 2 + rt * (dC / sc) * (dH / sh))


def distances(colours: dict[str, str], kind: str | None = None) -> list[tuple[float, str, str]]:
    """Every pair's CIEDE2000 distance as seen with ``kind``, closest first."""
    labs = {name: lab(c, kind) for name, c in colours.items()}
    out = [(ciede2000(labs[a], labs[b]), a, b) for a, b in itertools.combinations(labs, 2)]
    return sorted(out)


def min_distance(colours: dict[str, str], kind: str | None = None) -> tuple[float, str, str]:
    """The closest pair of ``colours`` (name -> '#RRGGBB') as seen with ``kind``."""
    return distances(colours, kind)[0]


if __name__ == "__main__":  # the palette's closest pairs, for whoever changes it
    from mmsim.figures import HTML_COLOURS, TERMINAL_COLOURS

    for title, colours in (("terminal classes", TERMINAL_COLOURS), ("HTML view", HTML_COLOURS)):
        print(title)
        for kind in (None, *CVD):
            d, a, b = min_distance(colours, kind)
            print(f"  {kind or 'normal vision':<13} closest: {a} / {b}: CIEDE2000 {d:.1f}")
