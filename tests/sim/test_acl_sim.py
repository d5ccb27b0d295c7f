"""Grants and revokes in the simulator (meshq.testing.sim.acl): they run under faults on a few seeds, replay
from their seed, and each checker of theirs fails on a broken variant."""

from __future__ import annotations

import pytest

from meshq.core.acl import Acl
from meshq.core.cluster.access import Access
from meshq.testing.sim import failing_runs, run_seed

SEEDS = (1, 2, 3, 4, 5, 6)
REAL_APPLY = Acl.apply


@pytest.mark.parametrize("seed", SEEDS)
def test_grants_are_agreed_and_kept_under_faults(seed):
    result = run_seed(seed, acl=True)
    assert result.ok, (f"{result.summary()}\noptions: {result.options}\n{result.violations[0]}\n"
                       f"replay: run_seed({seed}, acl=True)")
    assert result.stats["acl_acked"] > 0 and result.stats["acl_checks"] > 0


def test_the_same_seed_with_grants_gives_the_same_trace():
    first, second = run_seed(3, acl=True), run_seed(3, acl=True)
    assert first.trace_digest == second.trace_digest


def _violations(seeds=SEEDS[:4]) -> list[str]:
    """The first violation of every failing run of ``seeds`` (grants on)."""
    return [violation for _seed, violation in failing_runs(seeds, stop_at=None, acl=True)]


def test_the_end_check_catches_a_node_that_acknowledges_a_change_it_never_proposed(monkeypatch):
    # Broken variant: the serving node answers "changed" at once and proposes nothing.
    def ack_without_proposing(self, route, message, now_s):
        self.out.reply(route, message.request_id, "acl_change_ok", {"changed": True})

    monkeypatch.setattr(Access, "serve_change", ack_without_proposing)
    found = _violations()
    assert found and all("is lost" in text for text in found), found


def test_the_end_check_catches_revokes_that_apply_as_nothing(monkeypatch):
    # Broken variant: a committed revoke changes nothing (everyone, the checker's replay too, agrees).
    def apply_without_revoke(self, command):
        return False if command.get("action") == "revoke" else REAL_APPLY(self, command)

    monkeypatch.setattr(Acl, "apply", apply_without_revoke)
    found = _violations()
    assert found and all("acknowledged revoke" in text for text in found), found


def test_the_per_node_check_catches_a_grant_applied_before_it_is_committed(monkeypatch):
    # Broken variant: the serving node applies the change to its grants at once, then proposes it.
    real = Access.serve_change

    def apply_early(self, route, message, now_s):
        body = message.body
        self.core.meta.acl.apply({"op": "acl", **{k: body[k] for k in ("action", "name", "permission", "pattern")}})
        real(self, route, message, now_s)

    monkeypatch.setattr(Access, "serve_change", apply_early)
    found = _violations()
    assert found and any("but the committed log gives" in text for text in found), found


def test_the_view_check_catches_a_storage_node_serving_client_nodes_every_grant(monkeypatch):
    # Broken variant: acl_view carries every grant, not only those client nodes check (request, serve).
    def serve_everything(self, route, message, now_s):
        self.out.reply(route, message.request_id, "acl_view_ok",
                       {"grants": self.core.meta.acl.listing(), "names": self.names})

    def take_everything(self, body):
        grants = Acl()
        for grant in body["grants"]:
            grants.apply({"action": "grant", **grant})
        self.view, self.names = grants, dict(body["names"])

    monkeypatch.setattr(Access, "serve_view", serve_everything)
    monkeypatch.setattr(Access, "_take_view", take_everything)
    found = _violations()
    assert found and all("is no committed state of them" in text for text in found), found


def test_the_end_check_catches_client_nodes_that_never_learn_a_grant_change(monkeypatch):
    # Broken variant: a client node asks for the view until it has one, never again.
    real = Access._refresh_view

    def once(self, key, now_s):
        if self.view is None:
            real(self, key, now_s)

    monkeypatch.setattr(Access, "_refresh_view", once)
    found = _violations()
    assert found and all("after the last grant change its view" in text for text in found), found


PUBSUB_SEEDS = (1, 2, 3, 4)


@pytest.mark.parametrize("seed", PUBSUB_SEEDS)
def test_publish_and_subscribe_grants_reach_the_client_nodes_views_under_faults(seed):
    result = run_seed(seed, acl=True, acl_pubsub=True)
    assert result.ok, (f"{result.summary()}\noptions: {result.options}\n{result.violations[0]}\n"
                       f"replay: run_seed({seed}, acl=True, acl_pubsub=True)")
    assert result.stats["acl_acked"] > 0 and result.stats["acl_view_checks"] > 0


def test_the_view_checks_catch_client_nodes_that_drop_the_pubsub_grants(monkeypatch):
    # Broken variant: a client node keeps only the request/serve grants of its view (as before pub/sub was
    # checked): its publishers and receivers would judge with no publish/subscribe grant at all.
    real = Access._take_view

    def without_pubsub(self, body):
        real(self, {**body, "grants": [g for g in body["grants"] if g["permission"] in ("request", "serve")]})

    monkeypatch.setattr(Access, "_take_view", without_pubsub)
    found = []
    for seed in PUBSUB_SEEDS:
        result = run_seed(seed, acl=True, acl_pubsub=True)
        if not result.ok:
            found.append(str(result.violations[0]))
    assert found and all("is no committed state of them" in text or "after the last grant change its view" in text
                         for text in found), found
