"""memhp.view.grpc_source: what the view asks a guest, given what the host says."""

from __future__ import annotations

from memhp.v1 import control_pb2, dm_pb2
from memhp.view.grpc_source import memory_request


def test_a_hyperv_guest_is_checked_against_what_the_host_backs_and_offered() -> None:
    vm = control_pb2.Vm(
        backed=[dm_pb2.PageRange(start_page=0, page_cnt=100)],
        regions=[
            control_pb2.Region(
                start_page=100,
                page_count=50,
                backed=[dm_pb2.PageRange(start_page=100, page_cnt=20)],
            )
        ],
    )
    req = memory_request(vm)
    assert req.host_truth
    assert [(r.start_pfn, r.end_pfn) for r in req.host_backed] == [(0, 100)]
    assert [(r.start_pfn, r.end_pfn) for r in req.host_offered] == [(100, 120)]


def test_a_virtio_mem_guest_is_checked_against_what_the_device_plugged() -> None:
    vm = control_pb2.Vm(
        backed=[dm_pb2.PageRange(start_page=0, page_cnt=100)],
        virtio_mem=control_pb2.VirtioMemInfo(
            plugged=[dm_pb2.PageRange(start_page=1000, page_cnt=512)]
        ),
    )
    req = memory_request(vm)
    assert req.host_truth
    assert [(r.start_pfn, r.end_pfn) for r in req.host_backed] == [(1000, 1512)]
    assert list(req.host_offered) == []
