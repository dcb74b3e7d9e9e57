#!/usr/bin/env python3
"""Validate PNG images returned by the service, with the standard library only.

    check_png.py FILE.png              a PNG file (the body of POST /sample with Accept: image/png)
    check_png.py --json FILE.json      a JSON /sample response: every base64 PNG in "images"

Checks the signature, every chunk's CRC, IHDR first and IEND last, that the IDAT stream inflates
to exactly the size IHDR implies (non-interlaced) and that every scanline filter byte is valid.
Prints one line per image (size, colour type, text-chunk keys) and exits 1 on the first failure.
"""

from __future__ import annotations

import base64
import json
import struct
import sys
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


def check_png(data: bytes) -> str:
    if not data.startswith(SIGNATURE):
        raise ValueError(f"not a PNG (starts with {data[:16]!r})")
    pos, chunks = len(SIGNATURE), []
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError("truncated chunk header")
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        ctype = data[pos + 4 : pos + 8]
        if pos + 12 + length > len(data):
            raise ValueError(f"truncated {ctype!r} chunk")
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(ctype + body) != crc:
            raise ValueError(f"bad CRC in {ctype!r} chunk")
        chunks.append((ctype, body))
        pos += 12 + length
    if not chunks or chunks[0][0] != b"IHDR" or chunks[-1][0] != b"IEND":
        raise ValueError("IHDR must come first and IEND last")
    width, height, depth, ctype_, _comp, _filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if width == 0 or height == 0 or ctype_ not in CHANNELS:
        raise ValueError(f"bad IHDR {width}x{height} colour type {ctype_}")
    raw = zlib.decompress(b"".join(body for t, body in chunks if t == b"IDAT"))
    if interlace == 0:
        stride = (width * CHANNELS[ctype_] * depth + 7) // 8
        if len(raw) != height * (stride + 1):
            raise ValueError(f"IDAT inflates to {len(raw)} bytes, expected {height * (stride + 1)}")
        if any(raw[row * (stride + 1)] > 4 for row in range(height)):
            raise ValueError("invalid scanline filter byte")
    keys = [body.split(b"\0", 1)[0].decode("latin-1") for t, body in chunks if t in (b"tEXt", b"iTXt", b"zTXt")]
    return f"PNG {width}x{height} depth {depth} colour type {ctype_}, {len(data)} bytes, text chunks {keys}"


def main(argv: list[str]) -> int:
    as_json = argv[:1] == ["--json"]
    paths = argv[1:] if as_json else argv
    if len(paths) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(paths[0], "rb") as fh:
        data = fh.read()
    try:
        if as_json:
            images = json.loads(data)["images"]
            if not images:
                raise ValueError("empty 'images' list")
            for i, b64 in enumerate(images):
                print(f"images[{i}]: {check_png(base64.b64decode(b64, validate=True))}")
        else:
            print(check_png(data))
    except Exception as exc:  # report and fail
        print(f"{paths[0]}: invalid: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
