"""Each biomarker's rendered cause in a phantom nodule, and the region where that cause lives.

A phantom (:mod:`.phantom_render`) starts from the nodule's real consensus contour. Every rated biomarker then
gets a visible cause whose strength follows the nodule's mean rating (``docs/method.md``, "Phantoms with a
known cause"), on the crop's 1 mm grid:

=============  ==========================================================  ===================================
target         cause (rating low -> high)                                  cause region (``cause_<target>``)
=============  ==========================================================  ===================================
sphericity     in-plane axis ratio set to 2.5 : 1 (linear) -> 1 : 1        ``nodule``: the whole nodule
               (render 3: on every slice, 3.4 : 1 -> 1 : 1, see below)
lobulation     in-plane lobes on the contour: none -> 45 % of the radius    ``boundary``: the boundary band
spiculation    eight radial spikes: none -> 3 mm (2) -> 8 mm long (5)       ``spikes``: the spikes' voxels
margin         edge blur: sigma 2.2 mm (poorly defined) -> 0.2 mm (sharp)   ``boundary``: the boundary band
texture        interior HU: -700 (ground glass) -> +30 (solid)              ``interior``: nodule minus core
calcification  a 600 HU core, 60 % of the volume, laminated (1) ... 15 %,     ``core``: the calcified core
               central (5) ... none (6)
subtlety       the lung around the nodule: hazy -450 HU (1) -> clear (5)     ``surround``: 2-6 mm outside it
diameter_mm    size (the contour's own)                                    ``nodule``: the whole nodule
=============  ==========================================================  ===================================

The boundary band is the nodule's mask dilated by 2 mm minus the mask eroded by 2 mm; the surround is the
mask dilated by 6 mm minus the mask dilated by 2 mm, so the two do not overlap. Lobulation and margin share
the boundary band by construction: a map cannot be told to be right for one and wrong for the other there.
A region can be empty (no spikes at spiculation 1, no core at calcification 6); such a nodule has no cause
region for that target.

Sphericity has two renderings (``version`` of :func:`render_causes`). Render 2 stretches the whole contour by its
3D in-plane moments (:func:`stretched`); a real contour's slices each have their own elongation and direction,
so the central slice shows the rating loosely. Render 3 makes every axial slice round (:func:`rounded`), adds
the lobes, then stretches every slice along the contour's long axis to the rating's ratio (:func:`elongated`,
:func:`axis_ratio_of`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_dilation, binary_erosion, distance_transform_edt, gaussian_filter, map_coordinates

#: the cause region of each target (see the module docstring)
CAUSE_REGION = {"subtlety": "surround", "calcification": "core", "sphericity": "nodule", "margin": "boundary",
                "lobulation": "boundary", "spiculation": "spikes", "texture": "interior", "diameter_mm": "nodule"}
REGIONS = ("nodule", "boundary", "interior", "core", "spikes", "surround")
CALCIUM_HU = 600.0
#: how sphericity can be rendered (:func:`render_causes`); the default is ``phantom_render.RENDER_VERSION``
RENDER_VERSIONS = (2, 3, 4, 5)
#: render 4 draws the elongated body on a grid this many times finer in-plane, then keeps each voxel's covered
#: fraction (partial volume), so that a small nodule's slice keeps its rating's axis ratio
SUPERSAMPLE = 4
N_SPIKES = 8


@dataclass(frozen=True)
class Ratings:
    """A nodule's mean ratings (LIDC-IDRI scales)."""

    subtlety: float
    calcification: float
    sphericity: float
    margin: float
    lobulation: float
    spiculation: float
    texture: float

    @classmethod
    def of(cls, row) -> Ratings:
        return cls(**{k: float(row[k]) for k in cls.__dataclass_fields__})


def _ball(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    g = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return (g**2).sum(0) <= radius**2 + 1e-9


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """``binary_dilation(mask, _ball(radius))``, the same voxels, from the exact Euclidean distance transform (a
    voxel is in it when a mask voxel lies within ``radius``; the squared distances are integers): many times
    faster than the dilation with a large ball (6 mm: ~30x; with a small one scipy's dilation is faster)."""
    if not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    return distance_transform_edt(~mask) ** 2 <= radius**2 + 1e-9


def _grid(shape: tuple[int, ...]) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(0) if mask.any() else (np.asarray(mask.shape, dtype=float) - 1) / 2


def stretched(soft: np.ndarray, sphericity: float) -> np.ndarray:
    """The soft mask stretched in the axial plane along its own long axis (and shrunk across, area kept) so that
    its in-plane axis ratio becomes ``e`` = 2.5 at sphericity 1 (linear) down to 1.0 at 5 (round); the contour's
    own elongation is replaced, its lobes and spicules kept."""
    e = float(np.interp(sphericity, [1.0, 5.0], [2.5, 1.0]))
    weight = np.clip(soft, 0.0, 1.0)
    if weight.sum() < 3:
        return soft
    g = _grid(soft.shape)
    c = (g * weight).reshape(3, -1).sum(1) / weight.sum()
    yx = (g[1:] - c[1:, None, None, None]).reshape(2, -1)
    cov = (yx * weight.reshape(-1)) @ yx.T / weight.sum()
    eig, vec = np.linalg.eigh(cov)
    u = vec[:, 1]  # the long axis (y, x)
    own = float(np.sqrt(eig[1] / max(eig[0], 1e-6)))
    s = float(np.clip(np.sqrt(e / own), 0.5, 2.0))  # along u by s, across by 1 / s: the ratio becomes own * s^2
    if abs(s - 1.0) < 1e-3:
        return soft
    rel = g - c[:, None, None, None]
    along = (rel[1] * u[0] + rel[2] * u[1]) / s  # where each output voxel samples the input
    across = (-rel[1] * u[1] + rel[2] * u[0]) * s
    src = np.stack([g[0], c[1] + along * u[0] - across * u[1], c[2] + along * u[1] + across * u[0]])
    return map_coordinates(soft, src, order=1, mode="constant", cval=0.0)


def axis_ratio_of(sphericity: float) -> float:
    """The in-plane axis ratio a sphericity rating renders: 3.4 : 1 at 1 (linear), 3.0 at 2, 2.6 at 3, 1.8 at 4,
    1 : 1 at 5 (round); steepest from 3 to 5, where most nodules are rated."""
    return float(np.interp(sphericity, [1.0, 2.0, 3.0, 4.0, 5.0], [3.4, 3.0, 2.6, 1.8, 1.0]))


def _plane_moments(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(centroid (y, x), covariance 2 x 2)`` of a 2D weight, or None when it holds less than 3 voxels."""
    total = weight.sum()
    if total < 3:
        return None
    g = _grid(weight.shape).reshape(2, -1)
    c = g @ weight.reshape(-1) / total
    d = g - c[:, None]
    return c, (d * weight.reshape(-1)) @ d.T / total


def _warp_plane(plane: np.ndarray, centre: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``out(p) = plane(centre + matrix (p - centre))``, linear, zero outside."""
    g = _grid(plane.shape).reshape(2, -1) - centre[:, None]
    src = centre[:, None] + matrix @ g
    return map_coordinates(plane, src, order=1, mode="constant", cval=0.0).reshape(plane.shape)


def rounded(soft: np.ndarray, min_voxels: float = 8.0, max_ratio: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """The soft contour with every axial slice made round, and the contour's long in-plane axis ``(y, x)``.

    Each slice is warped about its own centroid so that its second moments become equal (area kept: the warp
    has determinant 1): a slice with axis ratio ``r`` is squeezed by ``sqrt(r)`` along its long axis and widened
    by ``sqrt(r)`` across. Slices more elongated than ``max_ratio`` are made ``max_ratio`` times rounder only;
    slices with less than ``min_voxels`` of weight use the moments of the whole contour. The lobes and spicules
    of the real contour are kept, only its elongation goes."""
    weight = np.clip(soft, 0.0, 1.0)
    whole = _plane_moments(weight.sum(0))
    if whole is None:
        return soft, np.array([1.0, 0.0])
    axis = np.linalg.eigh(whole[1])[1][:, 1]
    out = np.zeros_like(soft)
    for z in range(soft.shape[0]):
        if weight[z].sum() < 1e-6:
            continue
        own = _plane_moments(weight[z]) if weight[z].sum() >= min_voxels else None
        if own is not None:
            centre, cov = own
        else:
            small = _plane_moments(weight[z])
            centre, cov = (small[0] if small is not None else whole[0]), whole[1]
        eig, vec = np.linalg.eigh(cov)
        eig = np.maximum(eig, 1e-6)
        ratio = np.sqrt(eig[1] / eig[0])
        k = min(ratio, max_ratio)  # the factor the slice is rounded by
        # sample the input at centre + M (p - centre): M = V diag(sqrt(k), 1 / sqrt(k)) V^T along (short, long)
        scale = np.array([1.0 / np.sqrt(k), np.sqrt(k)])
        out[z] = _warp_plane(soft[z], centre, vec @ np.diag(scale) @ vec.T)
    return out, axis


def elongated(soft: np.ndarray, sphericity: float, axis: np.ndarray) -> np.ndarray:
    """Every axial slice stretched about its own centroid along ``axis`` ``(y, x)`` by ``sqrt(e)`` and shrunk
    across by ``sqrt(e)`` (area kept), ``e`` = :func:`axis_ratio_of` the rating: a round slice gets axis ratio
    ``e``."""
    e = axis_ratio_of(sphericity)
    if e < 1.0 + 1e-3:
        return soft
    u = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    basis = np.stack([np.array([-u[1], u[0]]), u], axis=1)  # columns: across, along
    matrix = basis @ np.diag([np.sqrt(e), 1.0 / np.sqrt(e)]) @ basis.T  # where each output voxel samples
    out = np.zeros_like(soft)
    for z in range(soft.shape[0]):
        moments = _plane_moments(np.clip(soft[z], 0.0, 1.0))
        if moments is None:
            out[z] = soft[z]
            continue
        out[z] = _warp_plane(soft[z], moments[0], matrix)
    return out


def elongated_cover(shape: np.ndarray, sphericity: float, axis: np.ndarray, factor: int = SUPERSAMPLE,
                    smooth: float = 0.5) -> np.ndarray:
    """The fraction of each voxel inside the body :func:`elongated` makes of ``shape`` (bool), in ``[0, 1]``.

    Every slice of ``shape`` is smoothed in-plane (Gaussian, ``smooth`` mm, so that its staircase edge becomes a
    curve), warped as :func:`elongated` does (about its own centroid, along ``axis``, to the rating's ratio; a
    round rating warps by the identity), sampled on a grid ``factor`` times finer, cut at 0.5, and averaged back
    over each voxel's ``factor x factor`` sub-voxels."""
    e = axis_ratio_of(sphericity)
    u = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    basis = np.stack([np.array([-u[1], u[0]]), u], axis=1)  # columns: across, along
    matrix = basis @ np.diag([np.sqrt(e), 1.0 / np.sqrt(e)]) @ basis.T
    soft = gaussian_filter(shape.astype(float), (0.0, smooth, smooth)) if smooth > 0 else shape.astype(float)
    ny, nx = shape.shape[1:]
    fine = (np.stack(np.meshgrid(np.arange(ny * factor), np.arange(nx * factor), indexing="ij")).reshape(2, -1)
            + 0.5) / factor - 0.5  # the sub-voxel centres, in voxels
    out = np.zeros(shape.shape)
    for z in range(shape.shape[0]):
        moments = _plane_moments(np.clip(soft[z], 0.0, 1.0))
        if moments is None:
            out[z] = shape[z]
            continue
        c = moments[0]
        src = c[:, None] + matrix @ (fine - c[:, None])
        inside = map_coordinates(soft[z], src, order=1, mode="constant", cval=0.0) >= 0.5
        out[z] = inside.reshape(ny, factor, nx, factor).mean(axis=(1, 3))
    return out


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Distance to the boundary in mm, positive inside (half a voxel at the first voxel each side)."""
    return np.where(mask, distance_transform_edt(mask) - 0.5, -(distance_transform_edt(~mask) - 0.5))


def lobulated(mask: np.ndarray, lobulation: float, phase: float, lobes: int = 4) -> np.ndarray:
    """Lobes on the contour: the signed distance plus ``a cos(lobes * theta + phase)`` (theta the axial angle
    about the centroid), ``a`` from 0 at lobulation 1 through half its full size at 2 to 45 % of the
    equivalent radius (at least 1.5 mm) at 5 (most nodules are rated 1 to 2.5)."""
    if not mask.any():
        return mask
    radius = (3 * mask.sum() / (4 * np.pi)) ** (1 / 3)
    a = float(np.interp(lobulation, [1.0, 2.0, 5.0], [0.0, 0.5, 1.0])) * max(0.45 * radius, 1.5)
    if a < 0.05:
        return mask
    c = _centroid(mask)
    g = _grid(mask.shape)
    theta = np.arctan2(g[1] - c[1], g[2] - c[2])
    out = signed_distance(mask) + a * np.cos(lobes * theta + phase) >= 0
    return out | mask if out.sum() < 0.5 * mask.sum() else out


def spikes(mask: np.ndarray, spiculation: float, rng: np.random.Generator, even: bool = False) -> np.ndarray:
    """Soft spikes ``[0, 1]`` outside ``mask``: ``N_SPIKES`` tapering lines (1.2 -> 0.4 mm radius) from the
    surface outwards, nearly in the axial plane, ``L`` long (0 at spiculation 1, 3 mm at 2, 8 mm at 5; +-25 %
    each). ``even`` (render 5): in the axial plane, evenly spaced, each as long as ``L`` times the body's radius
    along it over their mean, so that the tips lie on the body's shape scaled up: the spiked outline keeps the
    body's axis ratio (sphericity) instead of adding an elongation of its own. The same random draws are taken."""
    out = np.zeros(mask.shape)
    length = float(np.interp(spiculation, [1.0, 2.0, 5.0], [0.0, 3.0, 8.0]))
    if length < 0.5 or not mask.any():
        return out
    c = _centroid(mask)
    g = _grid(mask.shape) - c[:, None, None, None]
    sd = signed_distance(mask)
    start = rng.uniform(0, 2 * np.pi)
    steps = np.arange(0.0, 24.0, 0.25)
    lines = []  # (direction, surface, length) of each spike
    for k in range(N_SPIKES):
        alpha = start + 2 * np.pi * k / N_SPIKES + rng.uniform(-0.25, 0.25) * (not even)
        d = np.array([rng.uniform(-0.2, 0.2) * (not even), np.sin(alpha), np.cos(alpha)])
        d /= np.linalg.norm(d)
        inside = map_coordinates(sd, c[:, None] + d[:, None] * steps, order=1, mode="constant", cval=-10.0) >= 0
        surface = float(steps[np.nonzero(inside)[0].max()]) if inside.any() else 0.0
        lines.append((d, surface, length * rng.uniform(0.75, 1.25)))
    if even:
        mean_surface = max(float(np.mean([s for _, s, _ in lines])), 1e-6)
        lines = [(d, s, length * s / mean_surface) for d, s, _ in lines]
    for d, surface, long in lines:
        tip = surface + long
        t = np.tensordot(d, g, axes=1)
        perp = np.sqrt(np.maximum((g**2).sum(0) - t**2, 0.0))
        frac = np.clip((t - surface) / max(tip - surface, 1e-6), 0.0, 1.0)
        width = 1.2 - 0.8 * frac
        spike = np.clip(width + 0.5 - perp, 0.0, 1.0) * (t >= 0) * (t <= tip)
        out = np.maximum(out, spike)
    return np.where(mask, 0.0, out)


def calcified_core(mask: np.ndarray, calcification: float, rng: np.random.Generator) -> np.ndarray:
    """The calcified core: the nodule's deepest voxels (nearest its centroid first among equals), a fraction of
    its volume (0.6 at rating 1, 0.45 at 2, 0.35 at 3, 0.25 at 4, 0.15 at 5, 0.07 at 5.75, none at 6); laminated
    (every other 1 mm shell of it) at ratings below 2.5, and off centre (the voxels nearest a point shifted
    halfway to the surface) from 3.5 to 4.5, as the rating's pattern says."""
    v = float(np.interp(calcification, [1, 2, 3, 4, 5, 5.75, 6], [0.6, 0.45, 0.35, 0.25, 0.15, 0.07, 0.0]))
    n = int(mask.sum())
    if v < 0.01 or n == 0:
        return np.zeros(mask.shape, dtype=bool)
    depth = distance_transform_edt(mask)
    g = _grid(mask.shape)
    c = _centroid(mask)
    if 3.5 <= calcification < 4.5:  # non-central: nearest a point halfway from the centre to the surface
        shift = rng.normal(size=3) * np.array([0.2, 1.0, 1.0])
        c = c + shift * 0.5 * depth.max() / (np.linalg.norm(shift) + 1e-9)
        score = -np.sqrt(((g - c[:, None, None, None]) ** 2).sum(0))
    else:
        score = depth - 0.01 * np.sqrt(((g - c[:, None, None, None]) ** 2).sum(0))
    score = np.where(mask, score, -np.inf)
    k = max(1, round(v * n))
    core = np.zeros(mask.shape, dtype=bool)
    core.flat[np.argsort(score, axis=None)[-k:]] = True
    if calcification < 2.5 and k > 1:  # laminated: alternate 1 mm shells, counted from the surface
        core &= (np.floor(depth) % 2 == 1) | (depth >= depth[core].max() - 0.5)
    return core


def cause_regions(mask: np.ndarray, core: np.ndarray, spike_mask: np.ndarray) -> dict[str, np.ndarray]:
    """The six regions (bool ``[z, y, x]``) of the module docstring's table."""
    inner = binary_erosion(mask, _ball(2.0))
    near = binary_dilation(mask, _ball(2.0))
    return {"nodule": mask, "boundary": near & ~inner, "interior": mask & ~core, "core": core,
            "spikes": spike_mask, "surround": _dilate(mask, 6.0) & ~near}


def surround_weight(mask: np.ndarray) -> np.ndarray:
    """1 from the surface to 5 mm out, falling linearly to 0 at 8 mm: where the subtlety haze lies."""
    if not mask.any():
        return np.zeros(mask.shape)
    out = distance_transform_edt(~mask)
    return np.clip((8.0 - out) / 3.0, 0.0, 1.0) * ~mask


def haze_hu(subtlety: float) -> float:
    """The lung's HU around a nodule: -450 at subtlety 1 (extremely subtle) to -850 at 5 (obvious: clear lung)."""
    return float(np.interp(subtlety, [1.0, 5.0], [-450.0, -850.0]))


def texture_hu(texture: float) -> float:
    """The interior HU: -700 at texture 1 (ground glass), -450 at 3 (part solid), -250 at 4, +30 at 5 (solid):
    steepest where most nodules are rated (4 to 5)."""
    return float(np.interp(texture, [1.0, 3.0, 4.0, 5.0], [-700.0, -450.0, -250.0, 30.0]))


def margin_sigma(margin: float) -> float:
    """The edge blur in mm: 2.2 at margin 1 (poorly defined) to 0.2 at 5 (sharp)."""
    return float(np.interp(margin, [1.0, 5.0], [2.2, 0.2]))


@dataclass(frozen=True)
class NoduleShape:
    """A phantom nodule before it is painted into the lung: ``mask`` (bool, body and spikes), ``body`` (the body's
    cover of each voxel in ``[0, 1]``: binary up to render 3, its partial volume from render 4), ``spike`` (the
    spikes' soft cover outside the body) and ``core`` (bool, the calcified core)."""

    mask: np.ndarray
    body: np.ndarray
    spike: np.ndarray
    core: np.ndarray

    def regions(self) -> dict[str, np.ndarray]:
        return cause_regions(self.mask, self.core, self.spike >= 0.5)


def nodule_shape(soft: np.ndarray, ratings: Ratings, rng: np.random.Generator, version: int = 2) -> NoduleShape:
    """The shape causes of a nodule whose consensus contour is ``soft`` (``[0, 1]`` on the crop grid): sphericity
    (``version``, see :func:`render_causes`), the lobes, the spikes and the calcified core."""
    phase = rng.uniform(0, 2 * np.pi)
    if version == 2:
        shape = lobulated(stretched(soft, ratings.sphericity) >= 0.5, ratings.lobulation, phase)
        body = shape.astype(float)
    elif version == 3:  # each slice made round, lobed, then stretched along one axis to the rating's ratio
        round_soft, axis = rounded(soft)
        shape = lobulated(round_soft >= 0.5, ratings.lobulation, phase)
        shape = elongated(shape.astype(float), ratings.sphericity, axis) >= 0.5
        body = shape.astype(float)
    elif version in (4, 5):  # render 3 with the stretched body's partial volume (5: and even spikes)
        round_soft, axis = rounded(soft)
        body = elongated_cover(lobulated(round_soft >= 0.5, ratings.lobulation, phase), ratings.sphericity, axis)
        shape = body >= 0.5
    else:
        raise ValueError(f"render version must be one of {RENDER_VERSIONS}, got {version!r}")
    spike = spikes(shape, ratings.spiculation, rng, even=version >= 5)
    return NoduleShape(shape | (spike >= 0.5), body, spike, calcified_core(shape, ratings.calcification, rng))


def paint(nodule: NoduleShape, ratings: Ratings, background: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The image (HU, float) of ``nodule`` in ``background`` (HU): the edge blurred by the margin rating, the lung
    around it hazed by subtlety, the interior at the texture's HU (``noise``: a unit correlated field), the core
    calcium."""
    soft_nodule = np.maximum(nodule.body, nodule.spike)
    sigma = margin_sigma(ratings.margin)
    soft_nodule = np.clip(gaussian_filter(soft_nodule, sigma), 0.0, 1.0) if sigma > 0 else soft_nodule
    hazy = surround_weight(nodule.mask)
    lung = background * (1 - hazy) + (haze_hu(ratings.subtlety) + (background - background.mean())) * hazy
    inside = np.where(nodule.core, CALCIUM_HU, texture_hu(ratings.texture) + 40.0 * noise)
    return lung * (1 - soft_nodule) + inside * soft_nodule


def render_causes(soft: np.ndarray, ratings: Ratings, background: np.ndarray, noise: np.ndarray,
                  rng: np.random.Generator, version: int = 2) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """``(image HU float, nodule mask, cause regions)`` of a nodule whose consensus contour is ``soft``
    (``[0, 1]`` on the crop grid) in ``background`` (HU), ``noise`` a unit correlated field for the interior:
    :func:`nodule_shape`, then :func:`paint`. ``version`` (:data:`RENDER_VERSIONS`) says how sphericity is
    rendered: 2 stretches the whole contour by its 3D in-plane moments (:func:`stretched`); 3 makes every slice
    round and stretches each along the contour's long axis (:func:`rounded`, :func:`elongated`), so that the
    central slice shows the rating's axis ratio; 4 draws render 3's body with its partial volume
    (:func:`elongated_cover`; :func:`~lidc_cdam.data.lidc.phantom_render.render_phantom` paints render 4 into a
    lung without vessels)."""
    nodule = nodule_shape(soft, ratings, rng, version)
    return paint(nodule, ratings, background, noise), nodule.mask, nodule.regions()
