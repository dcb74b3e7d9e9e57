"""sd-webui-controlnet's unit forms as its clients send them (read from the extension's
internal_controlnet/args.py and external_code.py), translated to our units without a model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.api.compat.a1111_controlnet import units
from service.models.controlnet.units import resize_mode
from service.sampling.errors import InputError
from tests.support.compat import png_b64

IMG, MASK = png_b64(np.full((8, 8, 3), 90)), png_b64(np.full((8, 8, 3), 255))


def _one(unit: dict[str, Any], **kw: Any) -> dict[str, Any]:
    out = units({"controlnet": {"args": [{"model": "cn", **unit}]}}, **kw)
    assert out is not None and len(out) == 1, out
    return out[0]


def test_image_forms_and_region_masks() -> None:
    """get_input_images_rgba: base64, {"image", "mask"}, [image, mask], a list of dicts; the mask
    also as mask_image or effective_region_mask (our unit's mask: its effective region)."""
    for image in (IMG, {"image": IMG, "mask": MASK}, [IMG, MASK], [{"image": IMG, "mask": MASK}]):
        unit = _one({"image": image})
        assert unit["image"] == IMG, image
    assert _one({"image": [IMG, MASK]})["mask"] == MASK
    assert _one({"image": IMG, "effective_region_mask": MASK})["mask"] == MASK
    assert _one({"input_image": IMG, "mask_image": MASK})["mask"] == MASK


def test_entries_that_are_not_units_are_skipped() -> None:
    out = units({"controlnet": {"args": [None, True, {"model": "cn", "image": IMG}, "x"]}})
    assert out is not None and len(out) == 1


def test_out_of_range_preprocessor_values_are_the_modules_defaults() -> None:
    """bound_check_params resets them; only in-range values pass through."""
    unit = _one({"image": IMG, "module": "canny", "processor_res": 0, "threshold_a": -1, "threshold_b": 1e9})
    assert not {"processor_res", "threshold_a", "threshold_b"} & unit.keys()
    assert _one({"image": IMG, "processor_res": 512})["processor_res"] == 512


def test_legacy_names_and_resize_modes() -> None:
    assert _one({"image": IMG, "guidance": 0.3})["guidance_end"] == 0.3
    assert _one({"image": IMG, "guidance": 0.3, "guidance_end": 0.8})["guidance_end"] == 0.8
    assert resize_mode("Inner Fit (Scale to Fit)") == 1 and resize_mode("Outer Fit (Shrink to Fit)") == 2
    assert resize_mode(3) == 0 and resize_mode("Just Resize (Latent upscale)") == 0


def test_a_unit_on_the_init_image_takes_the_bodys_resize_mode() -> None:
    """controlnet.py: a unit without an image uses p.init_images with p.resize_mode."""
    assert _one({"image": ""}, init_image=IMG, init_resize_mode=2)["resize_mode"] == 2
    assert _one({"image": "", "resize_mode": "Crop and Resize"}, init_image=IMG)["resize_mode"] == 0
    gated = object()  # the route hands the init image over decoded (a GatedImage)
    assert _one({"image": ""}, init_image=gated)["image"] is gated
    assert (
        _one({"image": IMG, "resize_mode": "Crop and Resize"}, init_image=IMG)["resize_mode"]
        == "Crop and Resize"
    )


@pytest.mark.parametrize("hires", [False, True])
def test_hr_option(hires: bool) -> None:
    """The extension hands every unit BOTH without hires fix (controlnet.py: ``unit.hr_option if
    high_res_fix else HiResFixOption.BOTH``): all three act; with hires each keeps its passes."""
    args = [
        {"model": "cn", "image": IMG, "hr_option": opt} for opt in ("Both", "Low res only", "High res only")
    ]
    out = units({"controlnet": {"args": args}}, hires=hires)
    assert out is not None and len(out) == 3
    expected = ["both", "low_res_only", "high_res_only"] if hires else [None, None, None]
    assert [u.get("hr_option") for u in out] == expected


def test_an_unknown_hr_option_is_a_422_naming_the_unit() -> None:
    with pytest.raises(InputError) as exc:
        units({"controlnet": {"args": [{"model": "cn", "image": IMG, "hr_option": "Sometimes"}]}}, hires=True)
    assert exc.value.field == "alwayson_scripts.controlnet.args[0].hr_option"
    assert "Low res only" in exc.value.message
