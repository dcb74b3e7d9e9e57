"""ComfyUI's LoadImage turns an image by its EXIF orientation (nodes.py: ImageOps.exif_transpose), so a
phone photo stored sideways loads upright, as every viewer shows it."""

from __future__ import annotations

import asyncio
import io
from types import SimpleNamespace

from PIL import Image

from service.comfy.nodes_image import load_image


def _phone_jpeg() -> bytes:
    """A 40 x 20 JPEG (stored landscape, left half red) tagged orientation 6: shown 20 x 40, turned
    90 degrees clockwise."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def test_load_image_turns_a_phone_photo_upright() -> None:
    data = _phone_jpeg()
    rt = SimpleNamespace(ctx=SimpleNamespace(load_image=lambda file, sub, kind: data))
    image, mask = asyncio.run(load_image().run(rt, image="phone.jpg"))  # type: ignore[arg-type]
    assert tuple(image.shape) == (1, 40, 20, 3) and tuple(mask.shape) == (1, 40, 20)
    # turned clockwise: the stored left (red) half is now the top
    top, bottom = image[0, :20].mean(dim=(0, 1)), image[0, 20:].mean(dim=(0, 1))
    assert top[0] > 0.9 and top[2] < 0.1 and bottom[2] > 0.9 and bottom[0] < 0.1
