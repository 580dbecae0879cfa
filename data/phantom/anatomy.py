"""Drawing one case's anatomy: body, cavity, spine, vessels and organs (with tumours)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from data.phantom.shapes import Anatomy, Blob, Column, FieldRegion, Paint, SmoothField
from data.phantom.tissues import MAX_DEFORM

# ----------------------------------------------------------------------------------------------
# Drawing an anatomy


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix Rz(az) @ Ry(ay) @ Rx(ax), angles in degrees."""
    a, b, c = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _blob(rng: np.random.Generator, centre: Sequence[float], radii: Sequence[float],
          angles: Sequence[float] = (0.0, 0.0, 0.0), jitter: float = 6.0, size: float = 0.08,
          deform: float = 0.07, bumps: float = 0.05) -> Blob:
    """A blob near ``centre`` with radii near ``radii`` (mm) and rotation near ``angles`` (deg)."""
    c = np.asarray(centre, dtype=np.float64) + rng.normal(0.0, jitter, 3)
    r = np.asarray(radii, dtype=np.float64) * rng.uniform(1 - size, 1 + size) \
        * rng.uniform(1 - size / 2, 1 + size / 2, 3)
    rot = _rotation(*(np.asarray(angles, dtype=np.float64) + rng.normal(0.0, 6.0, 3)))
    # Degree-1 terms only shift the shape: keep them small; degree 2-3 give the lobulation.
    harm = rng.normal(0.0, deform, 9) * np.array([0.4, 0.4, 0.4, 1, 1, 1, 1, 1, 0.7])
    field = None
    if bumps > 0:
        h = np.sqrt(((rot * r[None, :]) ** 2).sum(axis=1)) * (1 + MAX_DEFORM)
        field = SmoothField.draw(rng, c - h, c + h, step=max(12.0, float(r.max()) * 0.45),
                                 amplitude=bumps)
    return Blob(c, r, rot, harm, field)


def _tumour(rng: np.random.Generator, host: Blob, spread: tuple[float, float],
            radius: tuple[float, float]) -> Blob:
    """A small round blob centred inside ``host`` (at ``spread`` fractions of its radii)."""
    v = rng.normal(size=3)
    v /= np.linalg.norm(v) + 1e-12
    centre = host.centre + host.rotation @ (host.radii * v * rng.uniform(*spread))
    r = math.exp(rng.uniform(math.log(radius[0]), math.log(radius[1])))
    return _blob(rng, centre, (r, r, r), rng.uniform(0, 360, 3), jitter=0.0, size=0.15,
                 deform=0.06, bumps=0.04)


@dataclass(frozen=True)
class _Body:
    """The body drawn first: half-axes of the body and its cavity, the layers organs are clipped to."""

    a: float
    b: float
    ai: float
    bi: float
    cavity: Column
    wall: Column
    fov: tuple[np.ndarray, np.ndarray]


def _draw_body(rng: np.random.Generator, steps: list[Paint]) -> _Body:
    """Body layers, mesenteric fat, lung bases and bowel gas (appended to ``steps``)."""
    u = rng.uniform
    # Body cross-section ~320 x 240 mm, fat and muscle layers, cavity inside.
    a, b = u(146.0, 162.0), u(106.0, 124.0)
    t_fat, t_mus = u(10.0, 26.0), u(7.0, 12.0)
    grow = u(-0.06, 0.06)  # body a little wider at the bottom or at the top
    ai, bi = a - t_fat - t_mus, b - t_fat - t_mus

    def layer(da: float, db: float) -> Column:
        return Column((0.0, 0.0), (da, db), zc=-80.0, radius_slope=grow)

    cavity, wall = layer(ai, bi), layer(a - t_fat, b - t_fat)
    steps += [Paint("fat", layer(a, b)), Paint("muscle", wall), Paint("bowel", cavity)]

    # Mesenteric fat between bowel loops, lung bases at the top, bowel gas.
    fov = (np.array([-a, -b, -260.0]), np.array([a, b, 80.0]))
    steps.append(Paint("fat", FieldRegion(SmoothField.draw(rng, *fov, step=16.0, amplitude=1.0),
                                          u(0.5, 0.9)), within=("bowel",)))
    for side in (-1, 1):
        steps.append(Paint("lung", _blob(rng, (side * 0.55 * ai, 0.3 * bi, 45.0),
                                         (0.45 * ai, 0.6 * bi, 62.0), bumps=0.0),
                           within=("bowel", "fat"), clip=cavity))
    for _ in range(int(rng.integers(4, 10))):
        c = (u(-0.7, 0.7) * ai, u(-0.85, 0.1) * bi, u(-175.0, -70.0))
        r = u(4.0, 13.0)
        steps.append(Paint("air", _blob(rng, c, (r, r * u(0.6, 1.4), r * u(0.6, 1.4)), jitter=0.0,
                                        bumps=0.0), within=("bowel",)))
    return _Body(a, b, ai, bi, cavity, wall, fov)


def _draw_spine(rng: np.random.Generator, body: _Body, steps: list[Paint]) -> float:
    """Paraspinal muscles, psoas, vertebrae with discs and the canal; returns the vertebral y (mm)."""
    u = rng.uniform
    b, wall = body.b, body.wall
    # Spine: paraspinal muscles, posterior arch, vertebral bodies with discs, canal; psoas. The
    # posterior structures stay inside the muscle wall (subcutaneous fat remains behind them).
    yv = 0.44 * b + u(-4.0, 4.0)
    for side in (-1, 1):
        steps.append(Paint("muscle", Column((side * u(26.0, 32.0), yv + 40.0), (u(22.0, 27.0), 19.0)),
                           clip=wall))
        steps.append(Paint("muscle", Column((side * u(30.0, 36.0), yv - 2.0), (0.5, 0.4), zc=-75.0,
                                            radius_slope=-u(0.16, 0.22), z_range=(-math.inf, -75.0))))
    rv = (u(19.0, 23.0), u(16.0, 19.0))
    period, disc = u(32.0, 37.0), u(6.0, 9.0)
    phase = u(0.0, period)
    steps += [
        Paint("bone", Column((0.0, yv + 27.0), (15.0, 13.0)), clip=wall),
        Paint("bone", Column((0.0, yv + 45.0), (5.0, 14.0)), clip=wall),
        Paint("bone", Column((0.0, yv), rv)),
        Paint("disc", Column((0.0, yv), rv, period=period, duty=disc, phase=phase)),
        Paint("canal", Column((0.0, yv + 26.0), (8.0, 7.0))),
    ]
    return yv


def _draw_organs(rng: np.random.Generator, body: _Body, yv: float, liver_tumours: int,
                 kidney_tumours: int, steps: list[Paint]) -> tuple[Blob, ...]:
    """Abdominal organs, vessels and tumours; returns the organs that bound the imaged z range."""
    u = rng.uniform
    ai, bi, cavity = body.ai, body.bi, body.cavity
    # Abdominal organs, all clipped to the cavity. Positions scale with the cavity size.
    stomach = _blob(rng, (0.38 * ai, -0.35 * bi, -52.0), (0.33 * ai, 0.33 * bi, 48.0), (0, 0, -20))
    gas = Blob(stomach.centre + np.array([0.0, -0.55 * stomach.radii[1], 0.35 * stomach.radii[2]]),
               stomach.radii * np.array([0.6, 0.45, 0.45]), stomach.rotation, np.zeros(9))
    steps += [Paint("stomach", stomach, clip=cavity),
              Paint("stomach_gas", gas, within=("stomach",))]
    pancreas = _blob(rng, (0.15 * ai, yv - 55.0, -88.0), (58.0, 11.0, 14.0), (0, -15, 8),
                     deform=0.08, bumps=0.08)
    steps.append(Paint("pancreas", pancreas, clip=cavity))

    liver = _blob(rng, (-0.47 * ai, -0.08 * bi, -72.0), (0.58 * ai, 0.9 * bi, 68.0), (0, 8, 0),
                  jitter=5.0, bumps=0.06)
    left_lobe = _blob(rng, (-0.04 * ai, -0.52 * bi, -45.0), (0.38 * ai, 0.38 * bi, 36.0), (0, 0, -10),
                      jitter=5.0)
    steps += [Paint("liver", liver, clip=cavity), Paint("liver", left_lobe, clip=cavity)]
    gb_z = liver.centre[2] - 0.45 * liver.radii[2]
    steps.append(Paint("gallbladder", _blob(rng, (-0.32 * ai, -0.55 * bi, gb_z), (14.0, 16.0, 28.0),
                                            (25, 0, 0), jitter=4.0), clip=cavity))
    spleen = _blob(rng, (0.74 * ai, 0.42 * bi, -55.0), (22.0, 50.0, 48.0), (0, 0, 32), jitter=5.0,
                   deform=0.09)
    steps.append(Paint("spleen", spleen, clip=cavity))

    kidneys = {}
    tumour_sides = [int(rng.integers(0, 2)) for _ in range(kidney_tumours)]
    for k, (side, name, z) in enumerate(((-1, "kidney_r", -102.0), (1, "kidney_l", -90.0))):
        kid = _blob(rng, (side * 0.53 * ai, 0.5 * bi, z + u(-6.0, 6.0)), (27.0, 19.0, 52.0),
                    (0, -side * 12.0, side * 30.0), jitter=4.0, size=0.1)
        steps.append(Paint(name, kid, clip=cavity))
        for _ in range(tumour_sides.count(k)):
            steps.append(Paint(name.replace("kidney", "kidney_tumour"),
                               _tumour(rng, kid, (0.1, 0.45), (12.0, 26.0)), within=(name,)))
        # Sinus fat towards the hilum (anteromedial): local +x for the right kidney, -x for the left.
        sinus = Blob(kid.centre + kid.rotation @ np.array([-side * 0.6 * kid.radii[0], 0.0, 0.0]),
                     kid.radii * np.array([0.5, 0.5, 0.45]), kid.rotation, np.zeros(9))
        steps.append(Paint("fat", sinus, within=(name,)))
        kidneys[name] = kid

    # Vessels last among normal structures: they pass through liver and pancreas.
    steps += [
        Paint("aorta", Column((u(12.0, 18.0), yv - 32.0), (u(10.0, 13.0),) * 2, zc=-80.0,
                              slope=(u(-0.04, 0.04), 0.0))),
        Paint("ivc", Column((u(-26.0, -19.0), yv - 30.0), (u(12.0, 15.0), u(8.0, 10.0)), zc=-80.0,
                            slope=(u(-0.04, 0.04), 0.0))),
    ]

    for _ in range(liver_tumours):
        steps.append(Paint("liver_tumour", _tumour(rng, liver, (0.0, 0.6), (6.0, 24.0)),
                           within=("liver",)))
    return (liver, left_lobe, spleen, *kidneys.values())


def draw_anatomy(rng: np.random.Generator, liver_tumours: int = 0, kidney_tumours: int = 0) -> Anatomy:
    """Draw one case's anatomy (mm, anatomy frame; see the module docstring).

    Args:
        rng: the case's random generator.
        liver_tumours: number of hypodense tumours inside the liver.
        kidney_tumours: number of tumours inside a kidney (side drawn per tumour).

    Returns:
        The :class:`Anatomy`; its ``z_range`` covers every labeled organ with a margin.
    """
    # The draw order (body, spine, organs, z range, texture) fixes every case's random stream.
    u = rng.uniform
    steps: list[Paint] = []
    body = _draw_body(rng, steps)
    yv = _draw_spine(rng, body, steps)
    organs = _draw_organs(rng, body, yv, liver_tumours, kidney_tumours, steps)
    fov = body.fov
    # Image everything from above the liver/spleen tops to below the lowest kidney pole.
    top = max(o.centre[2] + o.half_extent()[2] for o in organs)
    bottom = min(o.centre[2] - o.half_extent()[2] for o in organs)
    z_range = (bottom - u(4.0, 14.0), top + u(4.0, 14.0))
    texture = SmoothField.draw(rng, *fov, step=14.0, amplitude=1.0)
    return Anatomy(tuple(steps), texture, z_range)
