"""Dropping CAP_NET_ADMIN from the calling thread, so tests can provoke EPERM from the kernel."""

from __future__ import annotations

import contextlib
import ctypes

CAP_NET_ADMIN = 12
_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


@contextlib.contextmanager
def without_net_admin():
    """This thread without CAP_NET_ADMIN in its effective set (capabilities are per thread)."""
    header = _CapHeader(0x20080522, 0)
    data = (_CapData * 2)()
    assert _libc.capget(ctypes.byref(header), data) == 0
    saved = data[0].effective
    data[0].effective = saved & ~(1 << CAP_NET_ADMIN)
    assert _libc.capset(ctypes.byref(header), data) == 0
    try:
        yield
    finally:
        data[0].effective = saved
        assert _libc.capset(ctypes.byref(header), data) == 0
