"""The wire's StructuredSpec as vLLM's StructuredOutputsParams on the worker (no engine is started)."""

from __future__ import annotations

import json

import pytest
from vllm.sampling_params import StructuredOutputsParams

from kvrelay.router.chat_vllm import structured_spec
from kvrelay.schemas.messages import SamplingSpec, StructuredSpec
from kvrelay.workers.vllm_engine.runtime import sampling_params, structured_outputs

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TAG = json.dumps({"type": "structural_tag", "format": {"type": "const_string", "value": "hi"}})


@pytest.mark.parametrize("spec, expected", [
    (StructuredSpec(json=json.dumps(SCHEMA)), StructuredOutputsParams(json=SCHEMA)),
    (StructuredSpec(json_object=True), StructuredOutputsParams(json_object=True)),
    (StructuredSpec(regex="[a-z]+"), StructuredOutputsParams(regex="[a-z]+")),
    (StructuredSpec(choice=["yes", "no"]), StructuredOutputsParams(choice=["yes", "no"])),
    (StructuredSpec(grammar='root ::= "a"'), StructuredOutputsParams(grammar='root ::= "a"')),
    (StructuredSpec(structural_tag=TAG), StructuredOutputsParams(structural_tag=TAG)),
    (StructuredSpec(json_object=True, disable_any_whitespace=True, disable_additional_properties=True),
     StructuredOutputsParams(json_object=True, disable_any_whitespace=True,
                             disable_additional_properties=True)),
], ids=["json", "json_object", "regex", "choice", "grammar", "structural_tag", "flags"])
def test_structured_outputs_maps_each_constraint(spec: StructuredSpec,
                                                 expected: StructuredOutputsParams) -> None:
    params = structured_outputs(spec)
    assert params == expected
    assert structured_spec(params) == spec  # and the router's mapping is its inverse


def test_structured_outputs_none_is_none() -> None:
    assert structured_outputs(None) is None
    assert structured_spec(None) is None


def test_sampling_params_carry_the_constraint_and_special_tokens() -> None:
    spec = SamplingSpec(structured=StructuredSpec(regex="[0-9]"), skip_special_tokens=False)
    params = sampling_params(spec, max_tokens=4, kv_params=None, delta=True)
    assert params.structured_outputs == StructuredOutputsParams(regex="[0-9]")
    assert params.skip_special_tokens is False
    plain = sampling_params(SamplingSpec(), max_tokens=4, kv_params=None, delta=True)
    assert plain.structured_outputs is None
