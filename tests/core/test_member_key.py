"""A client node's CURVE public key travels in its member info (``wire.MEMBER_INFO`` ``key``), so that peers
connect to it with the right server key; storage members never carry one."""

from __future__ import annotations

import pytest

from meshq.core import wire
from meshq.core.membership import Member, MemberTable
from meshq.errors import ProtocolError

KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # 40 z85 characters


def _info(**extra) -> dict:
    return {"node_id": "c1", "address": "tcp://127.0.0.1:7000", "pub_address": "tcp://127.0.0.1:7001",
            "role": "client", "incarnation": 5, **extra}


def test_key_is_optional_and_checked():
    assert "key" not in wire.MEMBER_INFO(_info(), "member")
    assert wire.MEMBER_INFO(_info(key=KEY), "member")["key"] == KEY
    with pytest.raises(ProtocolError):
        wire.MEMBER_INFO(_info(key="short"), "member")
    with pytest.raises(ProtocolError):
        wire.MEMBER_INFO(_info(key=b"x" * 40), "member")


def test_member_without_key_sends_none_and_with_one_sends_it():
    assert "key" not in Member("s1", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "storage", 1).to_wire()
    assert Member("c1", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "client", 1, key=KEY).to_wire()["key"] == KEY


def test_table_learns_a_clients_key_and_never_a_storage_members_later():
    me = Member("s0", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "storage", 1)
    table = MemberTable(me, 3.0, 300.0)
    table.learn(_info(), 0.0)
    assert table.get("c1").key == ""
    table.learn(_info(key=KEY), 1.0)  # the same incarnation, now with its key (e.g. first heard through gossip)
    assert table.get("c1").key == KEY
    table.learn({**_info(), "node_id": "s1", "role": "storage"}, 0.0)
    table.learn({**_info(key=KEY), "node_id": "s1", "role": "storage"}, 1.0)
    assert table.get("s1").key == ""
