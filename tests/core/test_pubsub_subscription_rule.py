"""The rule a keyed PUB judges subscriptions by (``frames.may_subscribe``) and the keyed data prefix."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshq.core.pubsub import frames
from meshq.errors import UsageError

ALICE = b"A" * 40
BOB = b"B" * 40


def test_a_key_may_subscribe_to_its_own_data_prefix_and_to_control_messages():
    assert frames.may_subscribe(frames.keyed_data_prefix("alice-1", ALICE), ALICE)
    assert frames.may_subscribe(frames.DATA_MARK + ALICE, ALICE)  # every node of its own key: the same key
    assert frames.may_subscribe(frames.CONTROL_PREFIX, ALICE)
    assert frames.may_subscribe(frames.CONTROL_PREFIX, None)


@pytest.mark.parametrize("topic", [frames.keyed_data_prefix("bob-1", BOB), frames.data_prefix("bob-1"), b"",
                                   frames.DATA_MARK, frames.DATA_MARK + ALICE[:39], b"x"])
def test_a_key_may_not_subscribe_to_other_data_or_to_everything(topic):
    assert not frames.may_subscribe(topic, ALICE)


def test_an_unknown_or_malformed_key_gets_no_data():
    prefix = frames.keyed_data_prefix("alice-1", ALICE)
    assert not frames.may_subscribe(prefix, None)
    assert not frames.may_subscribe(prefix, b"")
    assert not frames.may_subscribe(frames.DATA_MARK, b"")


@given(st.binary(max_size=80))
def test_a_taken_data_subscription_matches_no_frame_addressed_to_another_key(topic):
    """Whatever the topic: if ``ALICE`` may take it, no frame to a ``BOB`` node starts with it."""
    if frames.may_subscribe(topic, ALICE) and topic[:1] != frames.CONTROL_PREFIX:
        assert not frames.keyed_data_prefix("n", BOB).startswith(topic)
        assert not frames.keyed_data_prefix("n" + ALICE.decode(), BOB).startswith(topic)


def test_the_keyed_prefix_takes_a_z85_key_only():
    assert frames.keyed_data_prefix("n1", ALICE) == b"M" + ALICE + b"n1\x00"
    with pytest.raises(UsageError):
        frames.keyed_data_prefix("n1", b"short")
