"""Snapshot files with SAs (needs ESP: real-kernel VM tier): keys redacted unless asked, 0600."""

from __future__ import annotations

import os
import stat

import pytest

from supervisor.kernel_state import ReadOptions, read_state
from supervisor.snapshot import load_snapshot, take_snapshot, write_snapshot

pytestmark = pytest.mark.realkernel

ENC_KEY = "0123456789abcdef0123456789abcdef"
AUTH_KEY = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"


def test_snapshot_file_redacts_sa_keys_by_default_and_keeps_them_on_request(netns, tmp_path):
    netns.sh(f"ip xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0xc0000042 reqid 1 "
             f"mode tunnel auth-trunc 'hmac(sha256)' 0x{AUTH_KEY} 128 enc 'cbc(aes)' 0x{ENC_KEY}")
    with netns.enter():
        state = read_state(ReadOptions())
    assert len(state.objects["xfrm_sa"]) == 1

    redacted = str(tmp_path / "redacted.json")
    write_snapshot(redacted, take_snapshot(state))
    text = open(redacted).read()
    assert ENC_KEY not in text and AUTH_KEY not in text
    assert "cbc(aes)" in text and "hmac(sha256)" in text      # algorithm names are kept
    assert stat.S_IMODE(os.stat(redacted).st_mode) == 0o600
    sa = load_snapshot(redacted).objects["xfrm_sa"][0]
    assert sa.spi == 0xc0000042
    assert all(alg.key is None and alg.key_len_bits for alg in sa.algorithms().values())

    full = str(tmp_path / "full.json")
    write_snapshot(full, take_snapshot(state, include_keys=True))
    text = open(full).read()
    assert ENC_KEY in text and AUTH_KEY in text
    loaded = load_snapshot(full)
    assert loaded.keys_included
    assert loaded.objects["xfrm_sa"][0] == state.objects["xfrm_sa"][0]
