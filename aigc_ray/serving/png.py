"""PNG inputs checked from their header before any pixel is decoded (no Ray, no torch at import).

A PNG's first 33 bytes are the signature and the IHDR chunk: width, height, bit depth and colour type
(RFC 2083 / PNG spec section 11.2.2). Reading them costs nothing, so a 40000x40000 "decompression
bomb" is refused from its declared size, before zlib inflates a byte of its IDAT data: the largest
buffer the decoder is ever given is the model's own image_size x image_size x channels.
"""

from __future__ import annotations

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# colour type -> (channels, name); 3 (palette) and alpha types are refused: the model takes plain pixels
COLOUR_TYPES = {0: (1, "grayscale"), 2: (3, "RGB"), 3: (1, "palette"), 4: (2, "grayscale+alpha"), 6: (4, "RGBA")}
ACCEPTED = {1: 0, 3: 2}  # model channels -> the one colour type taken for it


class BadImage(ValueError):
    """An input image the model cannot take; the message names what is wrong (the caller adds the field)."""


def png_header(data: bytes) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from the IHDR chunk, which the PNG spec puts first."""
    if data[:8] != SIGNATURE:
        kind = "GIF" if data[:4] == b"GIF8" else "JPEG" if data[:3] == b"\xff\xd8\xff" else "not a PNG"
        raise BadImage(f"{kind}: only PNG images are taken (no PNG signature)")
    if len(data) < 33:
        raise BadImage("truncated PNG header")
    length, kind = struct.unpack(">I4s", data[8:16])
    if kind != b"IHDR" or length != 13:
        raise BadImage("malformed PNG: the first chunk is not a 13-byte IHDR")
    if zlib.crc32(data[12:29]) != int.from_bytes(data[29:33], "big"):
        raise BadImage("malformed PNG: IHDR checksum mismatch")
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


def check_png(data: bytes, image_size: int, channels: int) -> None:
    """Raise BadImage unless `data` declares an 8-bit image_size x image_size PNG of the model's channels."""
    width, height, depth, colour = png_header(data)
    if (width, height) != (image_size, image_size):
        raise BadImage(f"expected {image_size}x{image_size} pixels, the PNG header declares {width}x{height}")
    if depth != 8:
        raise BadImage(f"expected 8 bits per sample, the PNG header declares {depth}")
    if colour != ACCEPTED[channels]:
        got = COLOUR_TYPES.get(colour, (0, f"unknown colour type {colour}"))[1]
        want = COLOUR_TYPES[ACCEPTED[channels]][1]
        raise BadImage(f"expected a {want} PNG ({channels} channel{'s' if channels > 1 else ''}), got {got}")
