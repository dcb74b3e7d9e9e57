"""GenerationRequest is THE list of request fields: the HTTP schema takes its fields, bounds, defaults
and docs from it; results record parameters from its fields (never a hand-written list)."""

from __future__ import annotations

import dataclasses

import pytest

from service.api.schemas import SampleRequest
from service.sampling.spec import MAX_STEPS, SamplingSpec
from service.serving.request import GenerationRequest, recorded_parameters, request_fields


def _bounds(info: object) -> dict[str, object]:
    out: dict[str, object] = {}
    for c in getattr(info, "metadata", []):
        if type(c).__module__ == "annotated_types":  # Ge, Le, MaxLen, ... (not validators)
            out |= dataclasses.asdict(c)
    return out


def test_the_http_schema_is_the_request_fields() -> None:
    fields = {f.name: f for f in request_fields() if f.metadata["http"]}
    assert list(SampleRequest.model_fields) == list(fields)
    assert [f.name for f in request_fields() if not f.metadata["http"]] == ["latent"]  # a tensor
    for name, info in SampleRequest.model_fields.items():
        f = fields[name]
        assert info.description == f.metadata["doc"], name
        assert _bounds(info) == f.metadata["bounds"], name
        assert info.get_default(call_default_factory=True) == GenerationRequest().__getattribute__(name)
    assert fields["steps"].metadata["bounds"]["le"] == MAX_STEPS
    body = SampleRequest.model_validate({"steps": 3, "loras": [{"name": "a", "weight": 0.5}], "prompt": "x"})
    req = body.request()
    assert (req.steps, req.prompt, req.loras[0].name, req.loras[0].weight) == (3, "x", "a", 0.5)


def test_the_schema_refuses_what_the_field_bounds_refuse() -> None:
    with pytest.raises(ValueError, match="less than or equal to 10000"):
        SampleRequest.model_validate({"steps": MAX_STEPS + 1})
    with pytest.raises(ValueError, match="at most 4000"):
        SampleRequest.model_validate({"prompt": "x" * 4001})


def test_parameters_are_recorded_from_the_fields() -> None:
    """Every field recorded "always" is in the parameters; a "given" one when it has a value (a new
    conditioning field is recorded with no edit here); images and deadlines never are."""
    req = GenerationRequest(prompt="a cat", clip_skip=2, guidance=4.0, init_image="....", timeout_s=9.0)
    spec = SamplingSpec("euler", "karras", 4, [1])
    params = recorded_parameters(req, spec, {"model": "m", "n": 1, "cfg_scale": 1.0, "width": 8, "height": 8})
    always = [f.name for f in request_fields() if f.metadata["record"] == "always"]
    assert set(always) <= set(params) and params["model"] == "m" and params["prompt"] == "a cat"
    assert params["clip_skip"] == 2 and params["guidance"] == 4.0
    assert not {"init_image", "mask", "timeout_s", "loras"} & set(params)
    assert (params["sampler"], params["steps"], params["seeds"]) == ("euler", 4, [1])
    given = [f.name for f in request_fields() if f.metadata["record"] == "given"]
    assert not set(given) & set(recorded_parameters(GenerationRequest(), spec, {}))
