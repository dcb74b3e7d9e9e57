"""A ControlNet unit's ``hr_option`` with a hires fix (sd-webui-controlnet's ``HiResFixOption``,
``hook.disabled_by_hr_option``): "Low res only" units act in the first pass only, "High res only"
units in the second only, "Both" in both; without a hires fix every unit acts (the extension hands
them ``BOTH`` then). Read off the rows each pass's driver carries (the unit table: ControlNet id
and weight per slot) on a tiny SD1 model with two tiny ControlNets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from service.models.controlnet import UNIT  # noqa: E402
from service.models.store import LoadedModel, ModelStore  # noqa: E402
from service.sampling.request import Limits  # noqa: E402
from service.serving.hires import HiresFix  # noqa: E402
from service.serving.request import ControlNetRef, GenerationRequest, build_job  # noqa: E402
from tests.models.test_controlnet_diffusers import control_png  # noqa: E402
from tests.support.controlnet_tiny import make_controlnet, save_folder  # noqa: E402
from tests.support.sd_tiny import save_diffusers, write_manifest  # noqa: E402


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    root: Path = tmp_path_factory.mktemp("cn-hires")
    save_diffusers(root / "sd1")
    write_manifest(root / "sd1")
    for name, seed in (("cn_a", 1), ("cn_b", 2)):
        save_folder(make_controlnet(seed=seed), root / "controlnet" / name)
    return ModelStore(root).load("sd1")


def _weights(cond: dict[str, torch.Tensor]) -> list[float]:
    """The weights of the units a pass's first row carries (id -1: an empty slot)."""
    table = cond[UNIT][0]
    return sorted(round(float(w), 3) for cid, w in table[:, :2].tolist() if cid >= 0)


def _units() -> list[ControlNetRef]:
    img = control_png(5)
    return [
        ControlNetRef("cn_a", img, weight=0.5, hr_option="both"),
        ControlNetRef("cn_a", img, weight=0.7, hr_option="Low res only"),
        ControlNetRef("cn_b", img, weight=0.9, hr_option="high_res_only"),
    ]


def test_each_pass_carries_the_units_of_its_hr_option(sd1: LoadedModel) -> None:
    request = GenerationRequest(
        model="sd1", prompt="a red cat", steps=2, width=64, height=64, seed=3, sampler="euler",
        controlnets=_units(), hires=HiresFix(scale=2, steps=1, upscaler="Latent", denoise=0.5),
    )  # fmt: skip
    job = build_job(request, sd1, Limits(), 60.0)
    driver = job.driver
    assert _weights(driver.cond) == [0.5, 0.7]  # the first pass: Both and Low res only
    second = driver._next(torch.zeros(1, 4, 8, 8))  # the hires pass, built from the first's latents
    assert second.sigmas.numel() > 0 and second.tracks[0].pending.x.shape[-1] == 16
    assert _weights(second.cond) == [0.5, 0.9]  # Both and High res only


def test_without_hires_every_unit_acts(sd1: LoadedModel) -> None:
    request = GenerationRequest(
        model="sd1", prompt="a red cat", steps=2, width=64, height=64, seed=3, sampler="euler",
        controlnets=_units(),
    )  # fmt: skip
    assert _weights(build_job(request, sd1, Limits(), 60.0).driver.cond) == [0.5, 0.7, 0.9]


def test_our_api_refuses_an_unknown_hr_option() -> None:
    from pydantic import ValidationError

    from service.api.schemas import SampleRequest

    with pytest.raises(ValidationError) as exc:
        SampleRequest.model_validate({"controlnets": [{"model": "cn_a", "hr_option": "Sometimes"}]})
    assert "hr_option" in str(exc.value) and "High res only" in str(exc.value)
    unit = SampleRequest.model_validate({"controlnets": [{"model": "cn_a", "hr_option": "High res only"}]})
    assert unit.controlnets is not None and unit.controlnets[0].hr_option == "high_res_only"
