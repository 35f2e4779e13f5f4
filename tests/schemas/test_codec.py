"""Every bus message round-trips, and bad input of every kind is a typed error, never a crash."""

from __future__ import annotations

import msgpack
import pytest

from kvrelay.schemas import (
    Cancel,
    ClientRequest,
    DecodeError,
    KVDescriptor,
    KVLayout,
    OversizeError,
    PrefillDone,
    PrefillTask,
    SamplingSpec,
    TokenChunk,
    UnknownTypeError,
    ValidationError,
    VersionError,
    WorkerInfo,
    unpack,
    unpack_any,
    pack,
)
from kvrelay.schemas.codec import raw_body

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=64, block_size=32, dtype="bfloat16", page_elems=4096)
DESC = KVDescriptor(backend="shm", worker_id="p1", host="h", region="r", block_ids=[3, 4], num_tokens=40,
                    ticket=7, lease_expires_ms=1, layout=LAYOUT)
SAMPLES = [
    PrefillTask(request_id="r", tenant="t", prompt_token_ids=[1, 2], sampling=SamplingSpec(stop=["\n"]),
                stream_subject="a.b", deadline_ms=10),
    PrefillDone(request_id="r", tenant="t", prompt_token_ids=[1], first_token_id=5, sampling=SamplingSpec(),
                stream_subject="a.b", deadline_ms=1, prefill_worker="p1", kv=DESC),
    TokenChunk(request_id="r", seq=3, token_ids=[9], text="x", finish_reason="length"),
    ClientRequest(request_id="r", stream_subject="a.b", prompt="hi"),
    WorkerInfo(worker_id="w", role="decode", model="m", host="h", block_size=32),
    Cancel(request_id="r"),
]


def envelope(t: str, v: object, b: object) -> bytes:
    return msgpack.packb({"t": t, "v": v, "b": b})


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_codec_roundtrip(msg) -> None:
    data = pack(msg)
    assert unpack(data, type(msg)) == msg
    assert unpack_any(data) == msg


@pytest.mark.parametrize(
    "data, error",
    [
        pytest.param(b"\xc1", DecodeError, id="not_msgpack"),
        pytest.param(msgpack.packb([1, 2]), DecodeError, id="not_a_map"),
        pytest.param(msgpack.packb({"t": "Cancel"}), DecodeError, id="missing_envelope_keys"),
        pytest.param(envelope("PrefillTask", 1, {}), UnknownTypeError, id="wrong_type"),
        pytest.param(envelope("Cancel", 2, {"request_id": "r"}), VersionError, id="future_version"),
        pytest.param(envelope("Cancel", "1", {"request_id": "r"}), VersionError, id="version_not_int"),
        pytest.param(envelope("Cancel", 1, {}), ValidationError, id="missing_field"),
        pytest.param(envelope("Cancel", 1, {"request_id": 5}), ValidationError, id="wrong_field_type"),
        pytest.param(envelope("Cancel", 1, {"request_id": "r", "extra": 1}), ValidationError, id="unknown_field"),
        pytest.param(envelope("Cancel", 1, {"request_id": "r" * 500}), ValidationError, id="too_long"),
        pytest.param(envelope("Cancel", 1, [1]), ValidationError, id="body_not_a_map"),
        pytest.param(b"\x00" * (1 << 21), OversizeError, id="oversize"),
    ],
)
def test_codec_rejects_bad_input_with_typed_error(data: bytes, error: type) -> None:
    with pytest.raises(error):
        unpack(data, Cancel)


def test_codec_nested_and_list_fields_are_validated() -> None:
    body = pack(SAMPLES[0])
    env = msgpack.unpackb(body)
    env["b"]["prompt_token_ids"] = [1, "2"]
    with pytest.raises(ValidationError, match=r"prompt_token_ids\[1\]"):
        unpack(msgpack.packb(env), PrefillTask)
    env["b"]["prompt_token_ids"] = [1]
    env["b"]["sampling"]["top_p"] = 2.0
    with pytest.raises(ValidationError, match="top_p"):
        unpack(msgpack.packb(env), PrefillTask)
    env["b"]["sampling"]["top_p"] = 1.0
    env["b"]["sampling"]["max_tokens"] = True  # a bool is not an int on the wire
    with pytest.raises(ValidationError, match="max_tokens"):
        unpack(msgpack.packb(env), PrefillTask)


def test_client_request_needs_exactly_one_prompt_form() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        ClientRequest.from_mapping({"request_id": "r", "stream_subject": "a", "prompt": "x",
                                    "prompt_token_ids": [1]})
    with pytest.raises(ValidationError, match="exactly one"):
        ClientRequest.from_mapping({"request_id": "r", "stream_subject": "a"})


def test_codec_encode_refuses_oversize_message() -> None:
    big = TokenChunk(request_id="r", seq=0, text="x" * (2 << 20))
    with pytest.raises(OversizeError):
        pack(big)


def test_codec_raw_body_reads_an_invalid_envelopes_body_as_sent() -> None:
    body = {"request_id": "r", "stream_subject": "a.b", "prompt": 3}  # fails validation: prompt
    assert raw_body(envelope("ClientRequest", 9, body)) == body  # no type, version or field checks
    assert raw_body(envelope("ClientRequest", 1, body), limit=8) is None  # larger than the limit


@pytest.mark.parametrize("data", [b"\xc1 not msgpack", msgpack.packb([1, 2]), msgpack.packb({"b": {}}),
                                  envelope("ClientRequest", 1, [1]), b"\x91" * 100_000],
                         ids=["garbage", "list", "no_envelope", "body_not_a_map", "deep_nesting"])
def test_codec_raw_body_is_none_for_what_is_no_envelope(data: bytes) -> None:
    assert raw_body(data) is None


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_codec_wire_bytes_are_plain_msgpack_of_the_envelope(msg) -> None:
    """The bytes are exactly what any msgpack library writes for {"t", "v", "b": body map}."""
    expected = msgpack.packb({"t": msg.TYPE, "v": msg.VERSION, "b": msg.to_mapping()}, use_bin_type=True)
    assert pack(msg) == expected
