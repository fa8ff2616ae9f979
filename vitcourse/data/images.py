"""Read untrusted image files (phone photo folders, downloads) as 8-bit RGB, or refuse them by name.

:func:`open_rgb8` decodes one file and returns a Pillow image in mode ``"RGB"``, applying these rules:

* **16-bit gray** (modes ``"I;16"``, ``"I;16B"``, ``"I;16L"``, ``"I;16N"``, and ``"I"``, which is how
  Pillow opens 16-bit PGM and, in older versions, 16-bit PNG): each value is scaled 0..65535 -> 0..255
  by a right shift of 8 bits (its high byte) -- the reduction Pillow itself applies to 16-bit RGB, RGBA
  and gray+alpha PNGs, so every 16-bit PNG is reduced the same way. ``convert("RGB")`` would clip them
  to near-white instead. Values outside 0..65535 (a true 32-bit integer image) are refused by name.
* **32-bit float** (mode ``"F"``) has no declared range: refused by name.
* **Transparency** (``"RGBA"``, ``"LA"``, ``"PA"``, ``"P"``/``"L"``/``"RGB"`` with a transparent colour,
  16-bit gray with one): composited on **black**, ``round(colour * alpha / 255)``. That is exactly what
  premultiplied images (``"RGBa"``, ``"La"``) already store, and it agrees with plain ``convert("RGB")``
  (which drops the alpha) for the usual fully transparent pixel ``(0, 0, 0, 0)``; the colour hidden
  under a transparent pixel no longer leaks into training.
* ``"1"``, ``"L"``, ``"P"``, ``"RGBX"``, ``"CMYK"``, ``"YCbCr"``, ``"LAB"``, ``"HSV"``: Pillow's own
  converters (palette expanded; CMYK as ``(255 - C) * (255 - K) / 255``, without ICC profiles).
* The EXIF orientation is applied (``ImageOps.exif_transpose``); unreadable EXIF is ignored.
* Multi-frame files (GIF, TIFF, APNG, MPO): the first frame.

Every refusal is an :class:`ImageError`, whose message is one sentence naming the file (through
:func:`display_name`) and saying what to do, and whose ``kind`` lets a caller group bad files.
The module depends only on the standard library, NumPy and Pillow.
"""

from __future__ import annotations

import os
import unicodedata

import numpy as np
from PIL import Image, ImageOps

__all__ = ["ImageError", "display_name", "open_rgb8", "decode_rgb8", "to_rgb8"]

_UNSAFE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"}  # controls, bidi/invisible, surrogates, odd spaces
_CONVERTIBLE = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_FIX = "convert it to an 8-bit PNG or JPEG first"


class ImageError(ValueError):
    """A file that cannot be used as an image; ``str(err)`` is one sentence naming it and saying what to do.

    ``path`` is the path as given; ``kind`` is ``"unreadable"`` (the file cannot be read),
    ``"corrupt"`` (damaged, truncated or not an image), ``"too large"`` (more pixels than
    ``PIL.Image.MAX_IMAGE_PIXELS``, a possible decompression bomb) or ``"unsupported"`` (a pixel
    format with no faithful 8-bit RGB rule, such as 32-bit float).
    """

    def __init__(self, path, kind: str, message: str) -> None:
        super().__init__(message)
        self.path, self.kind = path, kind


def _printable(text: str) -> str:
    """``text`` with control, bidi, invisible and unusual space characters escaped as ``\\xNN``/``\\uNNNN``."""
    def escape(c: str) -> str:
        n = ord(c)
        return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"

    return "".join(escape(c) if c != " " and unicodedata.category(c) in _UNSAFE else c for c in text)


def display_name(path) -> str:
    """``path`` (str, bytes or path-like) as text that prints safely on any terminal.

    Bytes that are not UTF-8 (bytes paths, or the surrogate escapes ``os.listdir`` puts in str
    paths) become ``\\xNN``; control characters, bidi overrides and invisible characters are
    escaped too, so a file name cannot rewrite or reorder the terminal line. Backslashes
    already in the name are left as they are.
    """
    name = os.fspath(path)
    if isinstance(name, str):
        try:
            name = name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # lone surrogates that are not escaped bytes: escaped below
            pass
    if isinstance(name, bytes):
        name = name.decode("utf-8", "backslashreplace")
    return _printable(name)


def _too_large(path, name: str, size: tuple[int, int] | None) -> ImageError:
    pixels = f"{size[0]}×{size[1]}" if size else "an unknown number of"
    return ImageError(path, "too large", f"{name} is too large to decode safely ({pixels} pixels, limit "
                                         f"{Image.MAX_IMAGE_PIXELS}); shrink it, or raise "
                                         f"PIL.Image.MAX_IMAGE_PIXELS if you trust the file.")


def _header_size(fp) -> tuple[int, int] | None:
    """``(width, height)`` from the header of the image in ``fp``, without Pillow's size check."""
    fp.seek(0)
    prefix = fp.read(16)
    for fmt in Image.ID:  # the formats Image.open tries, in its order
        factory, accept = Image.OPEN[fmt]
        if accept is None or accept(prefix):
            try:
                fp.seek(0)
                return factory(fp, "").size
            except Exception:  # not this format
                continue
    return None


def open_rgb8(path) -> Image.Image:
    """The image in file ``path`` as an 8-bit ``"RGB"`` Pillow image (see the module docstring for the rules).

    ``path`` may be a str (with surrogate escapes for non-UTF-8 names), bytes or a path-like.
    Raises :class:`ImageError` for a file that cannot be read, is corrupt, truncated or not an
    image, has more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels, or has an unsupported pixel format.
    """
    try:
        fp = open(path, "rb")
    except OSError as err:  # missing, no permission, a directory, a broken link
        raise ImageError(path, "unreadable", f"{display_name(path)} cannot be read "
                                             f"({_printable(err.strerror or str(err))}); check that it exists and "
                                             f"that you may read it, or delete it.") from None
    with fp:
        return _decode(fp, path)


def decode_rgb8(data: bytes, path) -> Image.Image:
    """:func:`open_rgb8` for the bytes ``data`` of the file ``path`` (already read, e.g. to hash them)."""
    import io

    return _decode(io.BytesIO(data), path)


def _decode(fp, path) -> Image.Image:
    """Decode the image in the open binary file ``fp`` (named ``path``): the rules of :func:`open_rgb8`."""
    name = display_name(path)
    try:
        image = Image.open(fp)
    except Image.DecompressionBombError:
        raise _too_large(path, name, _header_size(fp)) from None
    except Image.UnidentifiedImageError:
        raise ImageError(path, "corrupt", f"{name} is not an image Pillow can read (damaged, or another kind "
                                          f"of file); re-export it as PNG or JPEG, or delete it.") from None
    except Exception as err:  # Pillow raises many types for broken headers
        raise _corrupt(path, name, err) from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:  # Pillow only warned
        raise _too_large(path, name, image.size)
    try:
        image.load()  # the first frame
    except MemoryError:
        raise ImageError(path, "too large", f"{name} is too large to decode in the memory available "
                                            f"({image.width}×{image.height} pixels); shrink it.") from None
    except Exception as err:  # truncated or damaged pixel data
        raise _corrupt(path, name, err) from None
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # unreadable EXIF: keep the stored orientation
        pass
    return to_rgb8(image, path)


def _corrupt(path, name: str, err: Exception) -> ImageError:
    reason = _printable(str(err) or type(err).__name__)
    return ImageError(path, "corrupt", f"{name} is corrupt or truncated ({reason}); re-export or re-download it, "
                                       f"or delete it.")


def to_rgb8(image: Image.Image, path=None) -> Image.Image:
    """``image`` (any Pillow mode) as 8-bit ``"RGB"`` by the module's rules; ``image`` itself if already RGB.

    ``path`` names the image in an :class:`ImageError` for an unsupported mode.
    """
    name = "the image" if path is None else display_name(path)
    mode = image.mode
    if mode == "F":
        raise ImageError(path, "unsupported", f"{name} is a 32-bit float image; {_FIX}.")
    if mode == "I" or mode.startswith("I;"):
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageError(path, "unsupported", f"{name} is an integer image with values outside "
                                                  f"0..65535; {_FIX}.")
        gray = (values.astype(np.uint32) >> 8).astype(np.uint8)
        transparent = image.info.get("transparency")
        if isinstance(transparent, int):
            gray[values == transparent] = 0
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
    if mode in ("RGBa", "La"):  # premultiplied: already composited on black
        bands = image.split()
        return Image.merge("RGB", bands[:3] if mode == "RGBa" else bands[:1] * 3)
    if mode in ("RGBA", "LA", "PA") or (mode in _CONVERTIBLE and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)
        rgb = (rgba[..., :3] * rgba[..., 3:] + 127) // 255  # round(c * a / 255): 255 is odd, so no ties
        return Image.fromarray(rgb.astype(np.uint8))
    if mode == "RGB":
        return image
    if mode in _CONVERTIBLE:
        return image.convert("RGB")
    raise ImageError(path, "unsupported", f"{name} has pixel mode {mode!r}, which has no 8-bit RGB rule here; "
                                          f"{_FIX}.")
