"""DM messages between the dataclasses of :mod:`memhp.dm` and the gRPC ``DmFrame``.

The state machines speak dataclasses; the processes speak protobuf. This is the one
place that maps one onto the other, field for field, both ways. A frame that cannot
become a valid message (no body, a page range outside 40/24 bits) raises
:class:`memhp.dm.ProtocolError` naming the field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from memhp import dm
from memhp.v1 import dm_pb2


def range_to_pb(r: dm.PageRange) -> dm_pb2.PageRange:
    return dm_pb2.PageRange(start_page=r.start_page, page_cnt=r.page_cnt)


def range_from_pb(r: dm_pb2.PageRange, what: str) -> dm.PageRange:
    try:
        return dm.PageRange(r.start_page, r.page_cnt)
    except dm.ProtocolError as err:
        raise dm.ProtocolError(f"{what}: {err}") from None


def _ranges_from_pb(ranges: Any, what: str) -> tuple[dm.PageRange, ...]:
    return tuple(range_from_pb(r, f"{what}[{i}]") for i, r in enumerate(ranges))


def _set_range(pb: dm_pb2.PageRange, r: dm.PageRange) -> None:
    pb.start_page = r.start_page
    pb.page_cnt = r.page_cnt


def to_frame(msg: dm.DmMessage) -> dm_pb2.DmFrame:
    """A DM dataclass as a ``DmFrame``."""
    frame = dm_pb2.DmFrame()
    write_frame(msg, frame)
    return frame


def write_frame(msg: dm.DmMessage, frame: dm_pb2.DmFrame) -> None:
    """Fill the empty ``frame`` (say the ``frame`` field of a stream message) with ``msg``.

    Filling the field in place spares building a ``DmFrame`` and copying it into the
    message that carries it.
    """
    frame.trans_id = msg.trans_id
    match msg:
        # The hot-add pair first: they are the bulk of the traffic.
        case dm.HotAddRequest():
            request = frame.hot_add_request
            _set_range(request.range, msg.range)
            if msg.region is not None:
                _set_range(request.region, msg.region)
        case dm.HotAddResponse():
            frame.hot_add_response.page_count = msg.page_count
            frame.hot_add_response.result = msg.result
        case dm.VersionRequest():
            frame.version_request.version = msg.version
            frame.version_request.is_last_attempt = msg.is_last_attempt
        case dm.VersionResponse():
            frame.version_response.is_accepted = msg.is_accepted
        case dm.CapabilitiesReport():
            frame.capabilities_report.CopyFrom(
                dm_pb2.CapabilitiesReport(
                    balloon=msg.balloon,
                    hot_add=msg.hot_add,
                    hot_add_alignment=msg.hot_add_alignment,
                    hot_remove=msg.hot_remove,
                    min_page_cnt=msg.min_page_cnt,
                    max_page_number=msg.max_page_number,
                )
            )
        case dm.CapabilitiesResponse():
            frame.capabilities_response.CopyFrom(
                dm_pb2.CapabilitiesResponse(
                    is_accepted=msg.is_accepted,
                    hot_remove=msg.hot_remove,
                    suppress_pressure_reports=msg.suppress_pressure_reports,
                )
            )
        case dm.StatusReport():
            frame.status_report.CopyFrom(
                dm_pb2.StatusReport(
                    num_avail=msg.num_avail,
                    num_committed=msg.num_committed,
                    page_file_size=msg.page_file_size,
                    zero_free=msg.zero_free,
                    page_file_writes=msg.page_file_writes,
                    io_diff=msg.io_diff,
                )
            )
        case dm.BalloonRequest():
            frame.balloon_request.num_pages = msg.num_pages
        case dm.BalloonResponse():
            frame.balloon_response.more_pages = msg.more_pages
            frame.balloon_response.ranges.extend(range_to_pb(r) for r in msg.ranges)
        case dm.UnballoonRequest():
            frame.unballoon_request.more_pages = msg.more_pages
            frame.unballoon_request.ranges.extend(range_to_pb(r) for r in msg.ranges)
        case dm.UnballoonResponse():
            frame.unballoon_response.SetInParent()
        case dm.InfoMessage():
            frame.info_message.max_page_count = msg.max_page_count
        case dm.AccessReport():
            frame.access_report.what = msg.what
            frame.access_report.ranges.extend(range_to_pb(r) for r in msg.ranges)
        case _:
            raise TypeError(f"not a DM message: {msg!r}")


def _version_request(t: int, b: Any) -> dm.DmMessage:
    return dm.VersionRequest(t, b.version, b.is_last_attempt)


def _caps_report(t: int, b: Any) -> dm.DmMessage:
    return dm.CapabilitiesReport(
        t,
        b.balloon,
        b.hot_add,
        b.hot_add_alignment,
        b.hot_remove,
        b.min_page_cnt,
        b.max_page_number,
    )


def _caps_response(t: int, b: Any) -> dm.DmMessage:
    return dm.CapabilitiesResponse(t, b.is_accepted, b.hot_remove, b.suppress_pressure_reports)


def _status(t: int, b: Any) -> dm.DmMessage:
    return dm.StatusReport(
        t,
        b.num_avail,
        b.num_committed,
        b.page_file_size,
        b.zero_free,
        b.page_file_writes,
        b.io_diff,
    )


def _hot_add_request(t: int, b: Any) -> dm.DmMessage:
    region = range_from_pb(b.region, "hot_add_request.region") if b.HasField("region") else None
    return dm.HotAddRequest(t, range_from_pb(b.range, "hot_add_request.range"), region)


_FROM_PB: dict[str, Callable[[int, Any], dm.DmMessage]] = {
    "version_request": _version_request,
    "version_response": lambda t, b: dm.VersionResponse(t, b.is_accepted),
    "capabilities_report": _caps_report,
    "capabilities_response": _caps_response,
    "status_report": _status,
    "balloon_request": lambda t, b: dm.BalloonRequest(t, b.num_pages),
    "balloon_response": lambda t, b: dm.BalloonResponse(
        t, b.more_pages, _ranges_from_pb(b.ranges, "balloon_response.ranges")
    ),
    "unballoon_request": lambda t, b: dm.UnballoonRequest(
        t, b.more_pages, _ranges_from_pb(b.ranges, "unballoon_request.ranges")
    ),
    "unballoon_response": lambda t, b: dm.UnballoonResponse(t),
    "hot_add_request": _hot_add_request,
    "hot_add_response": lambda t, b: dm.HotAddResponse(t, b.page_count, b.result),
    "info_message": lambda t, b: dm.InfoMessage(t, b.max_page_count),
    "access_report": lambda t, b: dm.AccessReport(
        t, _ranges_from_pb(b.ranges, "access_report.ranges"), b.what or "allocate"
    ),
}


def from_frame(frame: dm_pb2.DmFrame) -> dm.DmMessage:
    """A ``DmFrame`` as a DM dataclass; ProtocolError when it cannot be one."""
    body = frame.WhichOneof("body")
    if body is None:
        raise dm.ProtocolError("dm_frame.body: a frame must carry exactly one DM message")
    return _FROM_PB[body](frame.trans_id, getattr(frame, body))
