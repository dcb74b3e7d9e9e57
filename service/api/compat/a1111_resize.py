"""How A1111's img2img prepares its init image: ``inpainting_fill`` 0 ("fill", the API's default;
``modules/masking.py`` ``fill``: the masked area painted from the unmasked colours by ever finer
blurs) and ``resize_mode`` (``modules/images.py`` ``resize_image``, no upscaler: Lanczos), the
latter applied to the init image and the mask alike before anything else reads them:

- 0 "Just resize": stretched to width x height;
- 1 "Crop and resize": scaled to cover width x height (aspect kept), centred, the rest cut off;
- 2 "Resize and fill": scaled to fit inside (aspect kept), centred, and the bands left over filled
  by stretching the resized image's first and last rows (or columns) across them;
- 3 "Just resize (latent upscale)": A1111 encodes the image at its own size and interpolates the
  latents; here it is stretched as 0 (the translator says so in ``comments``).
"""

from __future__ import annotations

from PIL import Image, ImageFilter, ImageOps

LANCZOS = Image.Resampling.LANCZOS


def resize_image(mode: int, im: Image.Image, width: int, height: int) -> Image.Image:
    """``im`` at (width, height) by A1111's resize mode ``mode`` (0-3)."""
    if mode not in (1, 2):
        return im.resize((width, height), resample=LANCZOS)
    ratio, src_ratio = width / height, im.width / im.height
    cover = mode == 1
    # A1111's integer arithmetic: one side is the target's, the other follows the image's aspect
    full_width = ratio > src_ratio if cover else ratio < src_ratio
    full_height = ratio <= src_ratio if cover else ratio >= src_ratio
    src_w = width if full_width else im.width * height // im.height
    src_h = height if full_height else im.height * width // im.width
    resized = im.resize((src_w, src_h), resample=LANCZOS)
    res = Image.new("L" if im.mode == "L" else "RGB", (width, height))  # A1111: RGB (a mask reads as L)
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if cover:
        return res
    if ratio < src_ratio:  # bands above and below
        fill = height // 2 - src_h // 2
        if fill > 0:
            res.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            bottom = resized.resize((width, fill), box=(0, resized.height, width, resized.height))
            res.paste(bottom, box=(0, fill + src_h))
    elif ratio > src_ratio:  # bands left and right
        fill = width // 2 - src_w // 2
        if fill > 0:
            res.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            right = resized.resize((fill, height), box=(resized.width, 0, resized.width, height))
            res.paste(right, box=(fill + src_w, 0))
    return res


# masking.fill's passes: (blur radius, times composited), coarse to fine
FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """``image`` with its masked area (``mask`` white, any size: resized to the image's) painted from
    the colours around it: the unmasked pixels, premultiplied by their alpha, blurred at each radius
    and composited over what the coarser passes left (A1111's inpainting_fill 0)."""
    mask = mask.convert("L")
    if mask.size != image.size:
        mask = mask.resize(image.size, Image.Resampling.BILINEAR)
    known = Image.new("RGBa", image.size)
    known.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask))
    out = Image.new("RGBA", image.size)
    for radius, repeats in FILL_PASSES:
        blurred = known.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")
