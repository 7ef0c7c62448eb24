"""A corpus of hostile images, generated on the spot: odd colour modes, truncated and corrupt files, multi-frame
files, EXIF rotation and decompression bombs by header, each with the status the service must answer.

HSV is missing: no format Pillow reads stores it (the unit tests convert an HSV image in memory instead).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

from PIL import Image

from .images import drawn_image, encode


@dataclass(frozen=True)
class HostileImage:
    name: str
    data: bytes
    status: int  # what /classify answers for it alone (200: classified)
    fragment: str = ""  # in the error's detail


def _frames(count: int, size: tuple[int, int] = (32, 32)) -> list[Image.Image]:
    return [drawn_image(10 + i, size=size, mode="RGB") for i in range(count)]


def _multi_frame(fmt: str) -> bytes:
    """Three different pictures in one file (fresh images: a save leaves its options on the frames)."""
    first, *rest = _frames(3)
    return encode(first, fmt, save_all=True, append_images=rest)


def _png_with_size(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR claims width x height (CRC fixed, so only the size is a lie)."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = 8 + 8  # signature, then length + type of the first chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def _gif_with_size(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # logical screen
    descriptor = data.index(b"\x2c")  # image descriptor: left, top, width, height
    data[descriptor + 5 : descriptor + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def _jpeg_with_size(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("L", (8, 8)), "JPEG"))
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _tiff_with_size(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("L", (8, 8)), "TIFF"))
    (ifd,) = struct.unpack("<I", data[4:8])
    (count,) = struct.unpack("<H", data[ifd : ifd + 2])
    for i in range(count):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack("<HH", data[entry : entry + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength
            value = width if tag == 256 else height
            data[entry + 8 : entry + 12] = struct.pack("<H", value) + b"\0\0" if kind == 3 else struct.pack("<I", value)
    return bytes(data)


def _bmp_with_size(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("L", (8, 8)), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def _webp_with_size(width: int, height: int) -> bytes:
    """An extended-format WebP (VP8X) whose canvas claims width x height."""
    frame = encode(Image.new("RGB", (8, 8)), "WEBP", lossless=True)
    vp8l = frame[12:]  # the image chunk after RIFF....WEBP
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (width - 1).to_bytes(3, "little")
    vp8x += (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + vp8l
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _corrupt_header(data: bytes, at: int) -> bytes:
    return data[:at] + bytes(b ^ 0xFF for b in data[at : at + 8]) + data[at + 8 :]


def _exif_rotated() -> bytes:
    """A 48x24 JPEG whose EXIF says 'rotate 90° clockwise': upright it is 24x48."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    return encode(drawn_image(20, size=(48, 24), mode="RGB"), "JPEG", exif=exif)


def hostile_images() -> list[HostileImage]:
    """The corpus; pictures are small (32x32) except the bombs, which are small files claiming huge sizes."""
    picture = drawn_image(7, size=(32, 32), mode="RGB")
    photo = encode(picture, "JPEG")
    png = encode(picture, "PNG")
    transparent = picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    bomb = "VITAE_MAX_IMAGE_PIXELS"
    return [
        # Colour modes, each classified.
        HostileImage("lab-tiff", encode(picture.convert("LAB"), "TIFF"), 200),
        HostileImage("ycbcr-tiff", encode(picture.convert("YCbCr"), "TIFF"), 200),
        HostileImage("i16-png", encode(Image.new("I;16", (32, 32), 40000), "PNG"), 200),
        HostileImage("i16-tiff", encode(Image.new("I;16", (32, 32), 1000), "TIFF"), 200),
        HostileImage("float-tiff", encode(picture.convert("F"), "TIFF"), 200),
        HostileImage("p-transparent-png", encode(transparent, "PNG", transparency=0), 200),
        HostileImage("p-transparent-gif", encode(transparent, "GIF", transparency=0), 200),
        HostileImage("1-bit-png", encode(picture.convert("1"), "PNG"), 200),
        HostileImage("1-bit-tiff", encode(picture.convert("1"), "TIFF", compression="group4"), 200),
        HostileImage("cmyk-jpeg", encode(picture.convert("CMYK"), "JPEG"), 200),
        HostileImage("la-png", encode(picture.convert("LA"), "PNG"), 200),
        # Several pictures in one file: the first is classified.
        HostileImage("mpo", _multi_frame("MPO"), 200),
        HostileImage("animated-gif", _multi_frame("GIF"), 200),
        HostileImage("animated-webp", _multi_frame("WEBP"), 200),
        HostileImage("animated-png", _multi_frame("PNG"), 200),
        HostileImage("multi-page-tiff", _multi_frame("TIFF"), 200),
        HostileImage("exif-rotated-jpeg", _exif_rotated(), 200),
        # Truncated and corrupt files.
        HostileImage("truncated-jpeg", _truncated(photo), 400, "truncated"),
        HostileImage("truncated-png", _truncated(png), 400, "truncated"),
        HostileImage("truncated-gif", _truncated(encode(picture, "GIF")), 400),
        HostileImage("truncated-webp", _truncated(encode(picture, "WEBP")), 400),
        HostileImage("truncated-tiff", _truncated(encode(picture, "TIFF")), 400),
        HostileImage("corrupt-png-header", _corrupt_header(png, 16), 400),
        HostileImage("corrupt-jpeg-header", _corrupt_header(photo, 2), 400),
        HostileImage("not-an-image", b"GIF89a but not really" * 10, 400),
        # Decompression bombs: a few hundred bytes claiming billions of pixels.
        HostileImage("bomb-png", _png_with_size(100_000, 100_000), 413, bomb),
        HostileImage("bomb-gif", _gif_with_size(65_535, 65_535), 413, bomb),
        HostileImage("bomb-jpeg", _jpeg_with_size(65_500, 65_500), 413, bomb),
        HostileImage("bomb-tiff", _tiff_with_size(60_000, 60_000), 413, bomb),
        HostileImage("bomb-webp", _webp_with_size(16_000, 16_000), 413, bomb),
        HostileImage("bomb-bmp", _bmp_with_size(100_000, 100_000), 413, bomb),
        # Just over the service's own limit, under Pillow's bomb threshold.
        HostileImage("large-png", _png_with_size(8_000, 6_000), 413, bomb),
    ]


MULTI_FRAME = ("mpo", "animated-gif", "animated-webp", "animated-png", "multi-page-tiff")


def first_frame_png(data: bytes) -> bytes:
    """The first frame of a multi-frame file as Pillow reads it, alone in a PNG."""
    with Image.open(io.BytesIO(data)) as image:
        image.seek(0)
        return encode(image.copy(), "PNG")
