"""Boxes a person draws on a photo (or ``auto``: let the focus pick): parsing, clipping, moving them onto a decoded
image. No torch: the CLI parses a box before anything loads, and the lean query path (`retrieval.lean`) takes them."""

from __future__ import annotations

from typing import Final, Literal

from retrieval.errors import UsageError

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the photo, x2 / y2 exclusive
Auto = Literal["auto"]  # the type of AUTO: after `box == AUTO` fails, a type checker knows box is a Box
AUTO: Final[Auto] = "auto"  # in place of a box: let `focus_weights` pick the part of the photo
BOX_FORMAT = "X1,Y1,X2,Y2 (pixels of the photo: left, top, right, bottom) or auto"


def parse_box(text: str) -> Box | Auto:
    """'x1,y1,x2,y2' -> a box, 'auto' -> `AUTO`; ValueError naming the format on anything else."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not (values[2] > values[0] and values[3] > values[1]):
        raise UsageError(f"a box is {BOX_FORMAT} with X2 > X1 and Y2 > Y1; got {text!r}")
    return values


def box_json(box: Box | Auto) -> list | str:
    """A parsed box as `--json` echoes it: `AUTO` as is, whole pixel values as ints."""
    return box if box == AUTO else [int(v) if float(v).is_integer() else v for v in box]


def clip_box(box: Box, size: tuple[int, int]) -> Box:
    """The box cut to a (width, height) photo; ValueError if nothing of it is left. `AUTO` stays."""
    if box == AUTO:
        return box
    width, height = size
    x1, y1, x2, y2 = max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height)
    if not (x2 > x1 and y2 > y1):
        raise UsageError(f"the box {','.join(f'{v:g}' for v in box)} lies outside the {width}x{height} photo")
    return x1, y1, x2, y2


def fit_box(box: Box | Auto, photo_size: tuple[int, int], image_size: tuple[int, int]) -> Box | Auto:
    """A box in pixels of the full-size photo -> clipped, in pixels of its decoded image (JPEG
    draft decoding shrinks the photo by 1/2^k; the box shrinks with it). `AUTO` stays."""
    if box == AUTO:
        return box
    x1, y1, x2, y2 = clip_box(box, photo_size)
    sx, sy = image_size[0] / photo_size[0], image_size[1] / photo_size[1]
    return x1 * sx, y1 * sy, x2 * sx, y2 * sy
