"""ClientRequest.session_id: additive, optional, validated on receipt."""

from __future__ import annotations

import msgpack
import pytest

from kvrelay.schemas.codec import unpack, pack
from kvrelay.schemas.errors import SchemaError
from kvrelay.schemas.messages import ClientRequest, check_session_id


def _body(**extra) -> dict:
    return {"request_id": "r1", "stream_subject": "client.r1", "prompt": "hi", **extra}


def _wire(body: dict) -> bytes:
    return msgpack.packb({"t": "ClientRequest", "v": 1, "b": body}, use_bin_type=True)


def test_messages_session_id_is_optional_and_round_trips() -> None:
    assert unpack(_wire(_body()), ClientRequest).session_id == ""  # older clients send none
    req = unpack(_wire(_body(session_id="agent-7:step")), ClientRequest)
    assert req.session_id == "agent-7:step"
    assert unpack(pack(req), ClientRequest) == req


@pytest.mark.parametrize("bad", ["x" * 129, "has space", "tab\there", "é", 7, None, ["a"]])
def test_messages_bad_session_id_is_a_schema_error(bad: object) -> None:
    with pytest.raises(SchemaError, match="session_id"):
        unpack(_wire(_body(session_id=bad)), ClientRequest)


def test_messages_check_session_id_limits() -> None:
    assert check_session_id("x" * 128) == "x" * 128
    assert check_session_id("") == ""
    with pytest.raises(SchemaError):
        check_session_id("x" * 129)
