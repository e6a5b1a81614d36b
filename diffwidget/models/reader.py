"""Read the objects of a scene-world image back: colour, shape, size and position.

A classical reader, built from the generator's own definitions (palette, shape drawing,
size ranges, anchors), so it needs no training and its accuracy on rendered scenes can be
checked exactly. It is what the adherence evaluation uses to score generated images.

Steps: every pixel is modelled as a blend of the background and one palette colour (which is
what anti-aliased edges and most decoder blur produce); pixels that are at least half a palette
colour form that colour's mask; connected components of each mask above a minimum area are
objects; the shape is the template (ellipse, box, upright triangle) in the object's bounding
box with the highest IoU; the size compares the object's radius (from its box and its area)
with the midpoint between the small and large ranges; the position is the anchor nearest to
the centre of its bounding box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from diffwidget.models.scenes import (
    ANCHORS,
    HALF_EXTENT,
    PALETTE,
    SQUARE_SCALE,
)

MIN_AREA_FRACTION = 0.006  # components below this share of the image are noise (~25 px at 64²)
BLEND_THRESHOLD = 0.5  # a pixel belongs to an object when it is at least half its colour
MAX_BLEND_RESIDUAL = 60.0  # RGB distance off the background-colour segment still accepted
#: Area of a shape as a multiple of r² (r = half-extent used to draw it).
AREA_PER_R2 = {"circle": np.pi, "square": (2 * SQUARE_SCALE) ** 2, "triangle": 2.0}
#: Bounding-box side as a multiple of r.
BOX_PER_R = {"circle": 2.0, "square": 2 * SQUARE_SCALE, "triangle": 2.0}
SIZE_THRESHOLD = (HALF_EXTENT["small"][1] + HALF_EXTENT["large"][0]) / 2


@dataclass(frozen=True)
class ReadObject:
    """One object found in an image.

    Attributes
    ----------
    colour, shape, size, position : str
        The attribute words of :mod:`diffwidget.models.scenes`.
    mask : np.ndarray
        bool [H, W], the object's pixels.
    centre : tuple of float
        (x, y) centre of the bounding box as fractions of the image size.
    radius : float
        Estimated half-extent as a fraction of the image size.
    shape_iou : float
        IoU of the mask with the chosen shape template (1 = a perfect shape).
    """

    colour: str
    shape: str
    size: str
    position: str
    mask: np.ndarray
    centre: tuple[float, float]
    radius: float
    shape_iou: float


def _templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Shape masks filling an h x w box, sampled at pixel centres."""
    y, x = np.mgrid[0:h, 0:w]
    u = (x + 0.5) / w  # 0..1 across the box
    v = (y + 0.5) / h
    circle = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    square = np.ones((h, w), dtype=bool)
    triangle = np.abs(u - 0.5) <= v / 2  # apex at the top centre, base along the bottom
    return {"circle": circle, "square": square, "triangle": triangle}


class SceneReader:
    """Recover the objects of a scene-world image.

    Parameters
    ----------
    min_area_fraction : float
        Smallest object, as a share of the image's pixels.

    Examples
    --------
    >>> from diffwidget.models.scenes import SceneWorld
    >>> scene = SceneWorld(seed=0).render_caption("a large red circle on the left")
    >>> [(o.colour, o.shape, o.size, o.position) for o in SceneReader().read(scene.image)]
    [('red', 'circle', 'large', 'left')]
    """

    def __init__(self, min_area_fraction: float = MIN_AREA_FRACTION) -> None:
        self.min_area_fraction = min_area_fraction
        self._names = list(PALETTE)
        self._colours = np.array([PALETTE[c] for c in self._names], dtype=np.float32)

    def colour_labels(self, image: np.ndarray) -> np.ndarray:
        """int [H, W]: index into the palette of each pixel's colour, -1 for background."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
        pixels = image.astype(np.float32)
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        background = np.median(border, axis=0)
        offset = pixels - background  # [H, W, 3]
        direction = self._colours - background  # [K, 3]
        # Blend share alpha of each palette colour, and the distance off that blend line.
        alpha = np.einsum("hwc,kc->hwk", offset, direction) / (direction**2).sum(axis=1)
        alpha = np.clip(alpha, 0.0, 1.0)
        residual = np.linalg.norm(offset[:, :, None, :] - alpha[..., None] * direction, axis=-1)
        best = residual.argmin(axis=-1)
        best_alpha = np.take_along_axis(alpha, best[..., None], axis=-1)[..., 0]
        best_residual = residual.min(axis=-1)
        foreground = (best_alpha >= BLEND_THRESHOLD) & (best_residual <= MAX_BLEND_RESIDUAL)
        return np.where(foreground, best, -1)

    def read(self, image: np.ndarray) -> list[ReadObject]:
        """Objects in ``image`` (uint8 [H, W, 3]), largest first."""
        labels = self.colour_labels(image)
        height, width = labels.shape
        scale = float(max(height, width))
        min_area = self.min_area_fraction * height * width
        objects = []
        for k, name in enumerate(self._names):
            components, _ = ndimage.label(labels == k)
            for index, box in enumerate(ndimage.find_objects(components), start=1):
                rows, cols = box
                # A filled component never outgrows its bounding box: most noise specks are
                # skipped before any hole filling.
                if (rows.stop - rows.start) * (cols.stop - cols.start) < min_area:
                    continue
                mask = np.zeros(labels.shape, dtype=bool)
                mask[box] = ndimage.binary_fill_holes(components[box] == index)
                area = int(mask.sum())
                if area < min_area:
                    continue
                objects.append(self._describe(name, mask, area, scale))
        objects.sort(key=lambda o: -int(o.mask.sum()))
        return objects

    def _describe(self, colour: str, mask: np.ndarray, area: int, scale: float) -> ReadObject:
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        box = mask[top:bottom, left:right]
        ious = {}
        for shape, template in _templates(*box.shape).items():
            ious[shape] = (box & template).sum() / (box | template).sum()
        shape = max(ious, key=ious.__getitem__)
        side = max(bottom - top, right - left)
        radius_box = side / BOX_PER_R[shape]
        radius_area = np.sqrt(area / AREA_PER_R2[shape])
        radius = float((radius_box + radius_area) / 2 / scale)
        size = "large" if radius >= SIZE_THRESHOLD else "small"
        cx, cy = (left + right) / 2 / scale, (top + bottom) / 2 / scale
        position = min(ANCHORS, key=lambda p: (ANCHORS[p][0] - cx) ** 2 + (ANCHORS[p][1] - cy) ** 2)
        return ReadObject(
            colour, shape, size, position, mask, (float(cx), float(cy)), radius, float(ious[shape])
        )
