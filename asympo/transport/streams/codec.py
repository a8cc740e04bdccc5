"""The entry format every service agrees on, and the checks made when decoding one.

An entry holds one protobuf message: field ``msg`` = ``SerializeToString()`` bytes, field
``type`` = the message's full name (e.g. ``asympo.v1.RolloutGroup``). :func:`decode` is the
one way an entry becomes a message; each way it can fail has a short reason (the
``reason`` label of ``asympo_dead_letters_total``).
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

from google.protobuf.message import DecodeError, Message

M = TypeVar("M", bound=Message)

FIELD_MSG = b"msg"
FIELD_TYPE = b"type"

# Dead-letter reasons (the ``reason`` label of asympo_dead_letters_total).
REASON_MISSING_FIELD = "missing_field"
REASON_WRONG_TYPE = "wrong_type"
REASON_DECODE_ERROR = "decode_error"
REASON_MAX_DELIVERIES = "max_deliveries"
REASON_TOO_LARGE = "too_large"


class StreamError(RuntimeError):
    """A stream operation failed in a way the caller should report (not a bug)."""


class DecodeFailure(ValueError):
    """An entry could not be turned into the expected message; ``reason`` is its label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def as_str(value: bytes | str) -> str:
    """An entry id (or other reply string) as ``str``, whatever the client's decoding."""
    return value.decode() if isinstance(value, bytes) else value


def encode(msg: Message) -> dict[bytes, bytes]:
    """The stream entry fields of ``msg``: ``{b"msg": bytes, b"type": full name}``."""
    return {FIELD_MSG: msg.SerializeToString(), FIELD_TYPE: msg.DESCRIPTOR.full_name.encode()}


def wire(fields: dict[bytes, bytes]) -> dict[Any, Any]:
    """``fields`` typed as redis-py's XADD wants them (its stubs reject dict[bytes, bytes])."""
    return cast("dict[Any, Any]", fields)


def decode(fields: dict[bytes, bytes], msg_cls: type[M], max_entry_bytes: int | None = None) -> M:
    """Parse stream entry ``fields`` as ``msg_cls``; raises :class:`DecodeFailure`.

    A payload over ``max_entry_bytes`` is refused before parsing (hostile input).
    """
    payload = fields.get(FIELD_MSG)
    type_name = fields.get(FIELD_TYPE)
    if payload is None or type_name is None:
        missing = [f.decode() for f in (FIELD_MSG, FIELD_TYPE) if f not in fields]
        raise DecodeFailure(REASON_MISSING_FIELD, f"entry has no field(s) {', '.join(missing)}")
    expected = msg_cls.DESCRIPTOR.full_name
    if type_name != expected.encode():
        raise DecodeFailure(
            REASON_WRONG_TYPE, f"type {type_name.decode(errors='replace')!r}, expected {expected!r}"
        )
    if max_entry_bytes is not None and len(payload) > max_entry_bytes:
        raise DecodeFailure(
            REASON_TOO_LARGE, f"{len(payload)} bytes exceeds max_entry_bytes={max_entry_bytes}"
        )
    msg = msg_cls()
    try:
        msg.ParseFromString(payload)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise DecodeFailure(REASON_DECODE_ERROR, f"{expected}: {exc}") from exc
    return msg
