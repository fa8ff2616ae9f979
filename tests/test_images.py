"""vitcourse.data.images: every Pillow mode to exact 8-bit RGB, refusals by name, safe display of file names."""

import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from vitcourse.data.images import ImageError, display_name, open_rgb8, to_rgb8

RNG = np.random.default_rng(0)


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(values, color_type, depth=16, size=None, chunks=b""):
    """Raw PNG bytes (written here, not by Pillow) of ``values`` (H, W[, C]); ``size`` overrides IHDR's."""
    h, w = size or values.shape[:2]
    data = values.astype(">u2" if depth == 16 else "u1")
    raw = b"".join(b"\0" + row.tobytes() for row in data)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))
            + chunks + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))


def _write(tmp_path, data, name="x.png"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _save(tmp_path, image, name, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


def _rgb(path_or_image, mode=None):
    """The RGB array read from a file or converted from an image; ``mode``: what Pillow opens the file as."""
    if isinstance(path_or_image, Image.Image):
        image = to_rgb8(path_or_image)
    else:
        if mode is not None:
            with Image.open(path_or_image) as opened:
                assert opened.mode == mode
        image = open_rgb8(path_or_image)
    assert image.mode == "RGB"
    return np.asarray(image)


def _over_black(rgb, alpha):
    return ((rgb.astype(np.uint16) * alpha[..., None] + 127) // 255).astype(np.uint8)


U16 = np.array([[0, 255, 256, 32767], [32768, 65280, 65534, 65535]], dtype=np.uint16)
U8 = RNG.integers(0, 256, (5, 7, 4), dtype=np.uint8)


# --------------------------------------------------------------------------- 8-bit modes


def test_rgb_and_rgbx_unchanged(tmp_path):
    assert np.array_equal(_rgb(_save(tmp_path, Image.fromarray(U8[..., :3]), "a.png"), "RGB"), U8[..., :3])
    assert np.array_equal(_rgb(Image.frombytes("RGBX", (7, 5), U8.tobytes())), U8[..., :3])


def test_bilevel_and_gray(tmp_path):
    bits = U8[..., 0] > 127
    assert np.array_equal(_rgb(_save(tmp_path, Image.fromarray(bits), "b.tif"), "1")[..., 1], bits * np.uint8(255))
    gray = _rgb(_save(tmp_path, Image.fromarray(U8[..., 0]), "g.png"), "L")
    assert np.array_equal(gray, np.repeat(U8[..., :1], 3, axis=2))


def _palette_image():
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
    image = Image.frombytes("P", (7, 5), index.tobytes())
    image.putpalette(palette.tobytes())
    return image, palette[index], index


def test_palette_expanded(tmp_path):
    image, expected, _ = _palette_image()
    assert np.array_equal(_rgb(_save(tmp_path, image, "p.png"), "P"), expected)


def test_palette_with_transparency_on_black(tmp_path):
    image, expected, index = _palette_image()
    alpha = RNG.integers(0, 256, 256, dtype=np.uint8)
    path = _save(tmp_path, image, "t.png", transparency=alpha.tobytes())
    assert np.array_equal(_rgb(path, "P"), _over_black(expected, alpha[index]))
    path = _save(tmp_path, image, "t.gif", transparency=int(index[0, 0]))  # one transparent index
    assert np.array_equal(_rgb(path, "P"), np.where((index == index[0, 0])[..., None], 0, expected))


def test_palette_alpha_mode_pa(tmp_path):
    image, expected, index = _palette_image()
    pa = Image.frombytes("PA", (7, 5), np.stack([index, U8[..., 3]], -1).tobytes())
    pa.putpalette(image.getpalette())
    assert np.array_equal(_rgb(_save(tmp_path, pa, "pa.tif"), "PA"), _over_black(expected, U8[..., 3]))


def test_rgba_and_la_on_black(tmp_path):
    rgba = Image.frombytes("RGBA", (7, 5), U8.tobytes())
    assert np.array_equal(_rgb(_save(tmp_path, rgba, "a.png"), "RGBA"), _over_black(U8[..., :3], U8[..., 3]))
    la = Image.frombytes("LA", (7, 5), U8[..., ::3].tobytes())
    assert np.array_equal(_rgb(_save(tmp_path, la, "la.png"), "LA"),
                          np.repeat(_over_black(U8[..., :1], U8[..., 3]), 3, axis=2))


def test_premultiplied_modes_keep_their_colours():
    assert np.array_equal(_rgb(Image.frombytes("RGBa", (7, 5), U8.tobytes())), U8[..., :3])
    assert np.array_equal(_rgb(Image.frombytes("La", (7, 5), U8[..., ::3].tobytes())),
                          np.repeat(U8[..., :1], 3, axis=2))


def test_cmyk(tmp_path):
    path = _save(tmp_path, Image.frombytes("CMYK", (7, 5), U8.tobytes()), "c.tif")
    c = U8.astype(int)
    assert np.array_equal(_rgb(path, "CMYK"), ((255 - c[..., :3]) * (255 - c[..., 3:]) + 127) // 255)


def test_ycbcr(tmp_path):
    ycc = U8[..., :3].copy()
    ycc[0, :, 1:] = 128  # first row neutral: exactly gray
    got = _rgb(_save(tmp_path, Image.frombytes("YCbCr", (7, 5), ycc.tobytes()), "y.tif"), "YCbCr").astype(int)
    assert np.array_equal(got[0], np.repeat(ycc[0, :, :1], 3, axis=1))
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128.0, ycc[..., 2] - 128.0  # JFIF
    want = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)
    assert np.abs(got - np.clip(np.round(want), 0, 255)).max() <= 1  # Pillow's fixed-point rounding


def test_lab(tmp_path):
    rgb = np.array([[[128, 128, 128], [200, 150, 100], [50, 100, 150], [255, 255, 255], [0, 0, 0]]], np.uint8)
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    lab = ImageCms.applyTransform(Image.fromarray(rgb), to_lab)
    assert lab.mode == "LAB"
    assert np.abs(_rgb(_save(tmp_path, lab, "l.tif"), "LAB").astype(int) - rgb).max() <= 1  # ICC rounding


def test_hsv():
    hsv = Image.frombytes("HSV", (4, 1), bytes([0, 255, 200, 85, 255, 255, 170, 255, 255, 9, 0, 77]))
    assert _rgb(hsv).tolist() == [[[200, 0, 0], [0, 255, 0], [0, 0, 255], [77, 77, 77]]]


# --------------------------------------------------------------------------- 16-bit and wider


def test_gray16_png_high_byte(tmp_path):
    expected = np.repeat((U16 >> 8).astype(np.uint8)[..., None], 3, axis=2)
    assert np.array_equal(_rgb(_write(tmp_path, _png(U16, 0)), "I;16"), expected)  # a PNG written here
    for name, mode, dtype in (("p.png", "I;16", "<u2"), ("t.tif", "I;16", "<u2"), ("b.tif", "I;16B", ">u2")):
        image = Image.frombytes(mode, (4, 2), U16.astype(dtype).tobytes())  # (Pillow's convert clips)
        assert np.array_equal(_rgb(_save(tmp_path, image, name), mode), expected), name


def test_gray16_transparent_value(tmp_path):
    path = _write(tmp_path, _png(U16, 0, chunks=_chunk(b"tRNS", struct.pack(">H", 65280))))
    expected = np.where(U16 == 65280, 0, U16 >> 8)
    assert np.array_equal(_rgb(path, "I;16")[..., 0], expected)


def test_mode_i_16bit_pgm_and_32bit_refused(tmp_path):
    pgm = _write(tmp_path, b"P5\n4 2\n65535\n" + U16.astype(">u2").tobytes(), "g.pgm")
    assert np.array_equal(_rgb(pgm, "I")[..., 2], U16 >> 8)
    wide = _save(tmp_path, Image.fromarray(np.array([[0, 70000]], np.int32)), "w.tif")
    with pytest.raises(ImageError, match=r"w\.tif is an integer image with values outside 0\.\.65535; "
                                         r"convert it to an 8-bit PNG or JPEG first\.") as err:
        open_rgb8(wide)
    assert err.value.kind == "unsupported"


def test_rgb16_and_rgba16_and_la16_png(tmp_path):
    rgb = np.stack([U16, U16[::-1], 65535 - U16], -1)
    assert np.array_equal(_rgb(_write(tmp_path, _png(rgb, 2)), "RGB"), rgb >> 8)  # Pillow keeps the high byte
    alpha = U16[:, ::-1]
    got = _rgb(_write(tmp_path, _png(np.concatenate([rgb, alpha[..., None]], -1), 6)))
    assert np.array_equal(got, _over_black((rgb >> 8).astype(np.uint8), (alpha >> 8).astype(np.uint8)))
    got = _rgb(_write(tmp_path, _png(np.stack([U16, alpha], -1), 4)))
    assert np.array_equal(got[..., 0], _over_black((U16 >> 8).astype(np.uint8)[..., None], alpha >> 8)[..., 0])


def test_float_refused(tmp_path):
    path = _save(tmp_path, Image.fromarray(np.ones((2, 2), np.float32)), "f.tif")
    with pytest.raises(ImageError, match=r"f\.tif is a 32-bit float image; convert it to an 8-bit PNG or JPEG"):
        open_rgb8(path)


# --------------------------------------------------------------------------- orientation, frames


def test_exif_orientation_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(tmp_path, Image.fromarray(U8[..., :3]), "o.png", exif=exif)
    assert np.array_equal(_rgb(path), np.rot90(U8[..., :3], -1))
    photo = np.zeros((64, 96, 3), np.uint8)
    photo[:32] = 255  # top half white
    got = _rgb(_save(tmp_path, Image.fromarray(photo), "o.jpg", exif=exif, quality=95))
    assert got.shape == (96, 64, 3) and got[:, 40:].mean() > 250 and got[:, :24].mean() < 5  # white on the right


def test_first_frame_of_multiframe_files(tmp_path):
    frames = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (10, 200)]
    for name in ("m.gif", "m.tif"):
        path = _save(tmp_path, frames[0], name, save_all=True, append_images=frames[1:])
        assert Image.open(path).n_frames == 2
        assert (_rgb(path) == 10).all()


# --------------------------------------------------------------------------- refusals


def test_bomb_header_is_too_large_not_corrupt(tmp_path):
    path = _write(tmp_path, _png(np.zeros((1, 1), np.uint8), 0, depth=8, size=(100_000, 100_000)), "bomb.png")
    with pytest.raises(ImageError) as err:
        open_rgb8(path)
    assert str(err.value).startswith(f"{path} is too large to decode safely (100000×100000 pixels, limit "
                                     f"{Image.MAX_IMAGE_PIXELS}); ")
    assert err.value.kind == "too large" and "corrupt" not in str(err.value)


@pytest.mark.parametrize("side", [4, 5])  # 16 pixels: Pillow only warns; 25 > 2 * 10: Pillow raises
def test_bomb_over_a_lowered_limit(tmp_path, monkeypatch, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    path = _save(tmp_path, Image.new("RGB", (side, side)), "big.png")
    with pytest.raises(ImageError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        open_rgb8(path)
    assert f"too large to decode safely ({side}×{side} pixels, limit 10)" in str(err.value)


@pytest.mark.parametrize("name", ["t.png", "t.jpg"])
def test_truncated_file_is_corrupt(tmp_path, name):
    path = _save(tmp_path, Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), name)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageError, match=r"t\.(png|jpg) is corrupt or truncated \(.+\); re-export") as err:
        open_rgb8(path)
    assert err.value.kind == "corrupt"


def test_non_image_and_missing_files(tmp_path):
    text = _write(tmp_path, b"hello, not an image\n", "notes.png")
    with pytest.raises(ImageError, match=r"notes\.png is not an image Pillow can read") as err:
        open_rgb8(text)
    assert err.value.kind == "corrupt" and isinstance(err.value, ValueError)
    with pytest.raises(ImageError, match=r"gone\.png cannot be read \(No such file or directory\)") as err:
        open_rgb8(tmp_path / "gone.png")
    assert err.value.kind == "unreadable"


# --------------------------------------------------------------------------- file names


def test_non_utf8_file_name(tmp_path):
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    try:
        with open(raw, "wb") as file:
            Image.fromarray(U8[..., :3]).save(file, "PNG")
    except OSError:  # a file system that only allows Unicode names (macOS)
        pytest.skip("file system refuses non-UTF-8 names")
    (listed,) = os.listdir(tmp_path)  # str with a surrogate escape: 'caf\udce9.png'
    assert listed == "caf\udce9.png"
    assert display_name(listed) == display_name(b"caf\xe9.png") == "caf\\xe9.png"
    display_name(tmp_path / listed).encode("ascii")  # prints on any terminal
    for path in (tmp_path / listed, os.path.join(str(tmp_path), listed), raw):
        assert np.array_equal(_rgb(path), U8[..., :3])
    (tmp_path / listed).write_bytes(b"junk")
    with pytest.raises(ImageError) as err:
        open_rgb8(tmp_path / listed)
    assert "caf\\xe9.png is not an image" in str(err.value)
    str(err.value).encode("utf-8")  # no UnicodeEncodeError


def test_names_cannot_spoof_the_terminal(tmp_path):
    assert display_name("invoice\u202egnp.exe") == "invoice\\u202egnp.exe"  # right-to-left override
    assert display_name("a\x1b[2Jb\nc\u200bd\u2066e") == "a\\x1b[2Jb\\x0ac\\u200bd\\u2066e"
    assert display_name("café photo 猫.png") == "café photo 猫.png"
    path = _write(tmp_path, b"junk", "cat\u202egnp.png")
    with pytest.raises(ImageError) as err:
        open_rgb8(path)
    assert "\u202e" not in str(err.value) and "cat\\u202egnp.png is not an image" in str(err.value)
