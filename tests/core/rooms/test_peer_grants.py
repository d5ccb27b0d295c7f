"""``serve`` and ``request`` between keyed client nodes (meshq.core.cluster.access, meshq.core.rpc.room):
client nodes learn the peer grants and the trusted keys' names from the storage nodes (``acl_view``), a
serving client node refuses a caller whose key's holder may not ``request`` the service, and a requester
ignores the offers of nodes whose key's holder may not ``serve`` it. Grant changes reach client nodes
without restarts; unkeyed nodes check nothing."""

from __future__ import annotations

from meshq.core.acl import ADMIN, CLUSTER, KEY_PREFIX
from meshq.core.events import AddSubscription, RpcRequest, ServeService, TrustedNames
from meshq.core.wire import SCHEMAS
from meshq.errors import AuthorizationError, NodeStoppedError, NoRespondersError
from tests.core.rooms.conftest import Net, error_of
from tests.core.rooms.test_rpc import finish

CLUSTER_KEY = "C" * 40
KEYS = {"c1": "A" * 40, "c2": "B" * 40, "c3": "D" * 40}  # client node -> its client key (z85, 40 characters)
NAMES = {"A" * 40: "alice", "B" * 40: "bob", "D" * 40: "dave"}  # cluster/trusted/ as the storage runtime reads it


def keyed_net() -> Net:
    """Storage node n1 (cluster key) and client nodes c1 (alice), c2 (bob), c3 (dave), every one keyed: each
    request arrives with the User-Id the receiver's ZAP handler would give (meshq.io.curve)."""
    net = Net("n1", public_key=CLUSTER_KEY)
    net.form()
    net["n1"].handle(TrustedNames(dict(NAMES)))
    keys = net.keys = dict(KEYS)  # type: ignore[attr-defined]
    for node_id, key in KEYS.items():
        net.add(node_id, role="client", data_dir=None, public_key=key)

    def caller(src: str, dst: str) -> str:
        if src not in keys:
            return CLUSTER
        return NAMES[keys[src]] if dst not in keys else KEY_PREFIX + keys[src]

    net.caller = caller
    net.introduce()
    net.run_until(lambda: all(net[c].core.access.view is not None for c in KEYS), 5.0)
    return net


def grant(net: Net, action: str, name: str, permission: str, pattern: str) -> None:
    reply = net["n1"].request("acl_change", {"action": action, "name": name, "permission": permission,
                                             "pattern": pattern}, caller=ADMIN)
    assert reply is not None and reply.type == "acl_change_ok", reply
    net.run(1.2)  # applied, and every client node has asked for the view again


def ask(net: Net, node_id: str, service: str = "svc.echo", timeout_s: float = 3.0) -> int:
    h = net[node_id]
    token = h.command(RpcRequest(service, b"hi", h.clock.now_s + timeout_s))
    net.pump()
    return token


def outcome(net: Net, node_id: str, token: int, within_s: float = 4.0):
    h = net[node_id]
    net.run_until(lambda: token in h.resolved or token in h.failed, within_s)
    return h.resolved[token] if token in h.resolved else h.failed[token]


def test_client_nodes_learn_the_peer_grants_and_the_names_of_trusted_keys():
    net = keyed_net()
    view = net["c1"].core.access
    assert view.names == NAMES and view.view.listing() == []
    net["n1"].request("acl_change", {"action": "grant", "name": "alice", "permission": "produce", "pattern": ">"},
                      caller=ADMIN)
    grant(net, "grant", "alice", "serve", "svc.>")
    # only the permissions client nodes check travel: produce stays with the storage nodes
    assert view.view.listing() == [{"name": "alice", "permission": "serve", "pattern": "svc.>"}]
    assert view.name_of_node("c2") == "bob" and view.name_of_node("n1") == CLUSTER
    assert view.may_node("c1", "serve", "svc.echo") and not view.may_node("c2", "serve", "svc.echo")
    assert view.may_node("n1", "serve", "anything")  # a storage node holds the cluster key
    # a client node serves no view; a storage node serves it to any trusted key
    assert error_of(net["c1"].request("acl_view", {}, caller=CLUSTER))[0] == "not_leader"
    assert net["n1"].request("acl_view", {}, caller="bob").body["names"] == NAMES
    assert "acl_view_ok" in SCHEMAS


def test_a_requester_ignores_offers_from_a_key_that_may_not_serve_and_heeds_them_once_granted():
    net = keyed_net()
    grant(net, "grant", "bob", "request", "svc.>")
    grant(net, "grant", "alice", "serve", "svc.echo")
    net.run(1.5)  # past the startup grace: "no responders" is said at once
    token = net["c1"].command(ServeService("svc.echo"))
    assert net["c1"].resolved.get(token, "missing") is None
    net.run(0.2)
    token = ask(net, "c2")
    net.run_until(lambda: net["c1"].jobs, 2.0)
    finish(net, "c1")
    assert outcome(net, "c2", token) == b"hi"

    grant(net, "revoke", "alice", "serve", "svc.echo")  # alice still offers it: her offer is ignored
    assert "c1" in net["c2"].core.adverts.of("services") and net["c2"].core.rpc.instances("svc.echo") == {}
    error = outcome(net, "c2", ask(net, "c2"))
    assert isinstance(error, NoRespondersError)
    assert "ignored: held by alice, with no grant to serve it" in str(error)
    assert not net["c1"].jobs  # never sent there

    grant(net, "grant", "alice", "serve", "svc.>")
    assert net["c2"].core.rpc.instances("svc.echo") == {"c1": False}
    token = ask(net, "c2")
    net.run_until(lambda: net["c1"].jobs, 2.0)
    finish(net, "c1")
    assert outcome(net, "c2", token) == b"hi"


def test_a_fresh_client_node_waits_for_its_view_before_choosing_an_instance():
    net = keyed_net()
    grant(net, "grant", "bob", "request", "svc.>")
    grant(net, "grant", "alice", "serve", "svc.echo")
    net["c1"].command(ServeService("svc.echo"))
    net.run(0.5)
    net.keys["c4"] = KEYS["c2"]  # another node of bob's, just started
    net.add("c4", role="client", data_dir=None, public_key=KEYS["c2"])
    net.introduce()
    net.run(0.3)  # it hears the adverts before the view (first asked in VIEW_FIRST_S)
    net["c4"].core.access.view = None  # (as if the first answer were still on its way)
    token = ask(net, "c4")
    assert token not in net["c4"].failed and not net["c1"].jobs  # waits (no view: alice unknown)
    net.run_until(lambda: net["c1"].jobs, 2.0)  # the view came: then sent
    finish(net, "c1")
    assert outcome(net, "c4", token) == b"hi"


def test_a_serving_client_node_refuses_a_caller_whose_key_may_not_request_until_granted():
    net = keyed_net()
    grant(net, "grant", "alice", "serve", "svc.>")
    net.run(1.5)
    token = net["c1"].command(ServeService("svc.echo"))
    assert net["c1"].resolved.get(token, "missing") is None
    net.run(0.2)
    error = outcome(net, "c2", ask(net, "c2"))
    assert isinstance(error, AuthorizationError), repr(error)
    assert str(error).startswith("client 'bob' may not request service 'svc.echo': no grant of request matches it")
    assert not net["c1"].jobs and net["c1"].core.access.counters["refused"] == 1  # refused before it ran
    grant(net, "grant", "bob", "request", "svc.*")
    token = ask(net, "c2")
    net.run_until(lambda: net["c1"].jobs, 2.0)
    finish(net, "c1")
    assert outcome(net, "c2", token) == b"hi"
    # a storage node holds the cluster key: it may request anything
    assert net["c1"].request("rpc_request", {"service": "svc.echo", "incarnation": 1, "timeout_ms": 1000},
                             (b"x",), request_id=9, caller=CLUSTER) is None  # (queued to run: no refusal)
    assert len(net["c1"].jobs) == 1


def test_a_caller_key_a_client_node_cannot_name_is_refused_and_the_view_asked_again():
    net = keyed_net()
    grant(net, "grant", "alice", "serve", "svc.>")
    net["c1"].command(ServeService("svc.echo"))
    asked = len(net.sent("c1", "acl_view"))
    code, message = error_of(net["c1"].request("rpc_request", {"service": "svc.echo", "incarnation": 1,
                                                               "timeout_ms": 1000}, (b"x",), request_id=9,
                                               caller=KEY_PREFIX + "Z" * 40))
    assert code == "authorization" and "cannot tell whose key " + "Z" * 40 in message
    net.run(0.1)
    assert len(net.sent("c1", "acl_view")) > asked  # asked at once, not at the next period
    assert not net["c1"].jobs


def test_a_client_node_that_knows_it_may_not_serve_says_so_when_asked_to():
    net = keyed_net()
    token = net["c3"].command(ServeService("svc.echo"))
    error = net["c3"].failed[token]
    assert isinstance(error, AuthorizationError) and "client 'dave' may not serve service 'svc.echo'" in str(error)
    assert "svc.echo" not in net["c3"].core.rpc.served


def test_a_keyed_client_node_trusts_no_client_instance_before_it_has_the_view():
    net = Net("n1", public_key=CLUSTER_KEY)
    net.form()
    c1 = net.add("c1", role="client", data_dir=None, public_key=KEYS["c1"])
    net.introduce()  # (c1 knows n1 is a storage member, and has no view: nothing pumped)
    assert c1.core.access.view is None and not c1.core.access.settled()
    assert not c1.core.access.may_node("c1", "serve", "svc.echo")
    assert c1.core.access.may_node("n1", "serve", "svc.echo")


def test_unkeyed_nodes_check_nothing_and_ask_for_no_view():
    net = Net("n1")
    net.form()
    net.add("c1", role="client", data_dir=None)
    net.add("c2", role="client", data_dir=None)
    net.introduce()
    net.run(1.5)
    assert not net.sent("c1", "acl_view") and net["c1"].core.access.settled()
    net["c1"].command(ServeService("svc.echo"))
    net.run(0.2)
    token = ask(net, "c2")
    net.run_until(lambda: net["c1"].jobs, 2.0)
    finish(net, "c1")
    assert outcome(net, "c2", token) == b"hi"


def test_a_fresh_client_node_holds_a_serve_until_its_view_says_whether_its_key_may():
    net = keyed_net()
    grant(net, "grant", "alice", "serve", "svc.>")
    for node_id, key in (("c5", KEYS["c3"]), ("c6", KEYS["c1"])):  # dave's second node, alice's second node
        net.keys[node_id] = key
        net.add(node_id, role="client", data_dir=None, public_key=key)
    refused, served = net["c5"].command(ServeService("svc.echo")), net["c6"].command(ServeService("svc.echo"))
    assert refused not in net["c5"].failed and served not in net["c6"].resolved  # held: no view yet
    net.introduce()
    net.run_until(lambda: refused in net["c5"].failed and served in net["c6"].resolved, 2.0)
    assert "client 'dave' may not serve service 'svc.echo'" in str(net["c5"].failed[refused])
    assert "svc.echo" in net["c6"].core.rpc.served and "svc.echo" not in net["c5"].core.rpc.served


def test_a_client_node_that_gets_no_view_serves_after_a_short_wait():
    net = Net("n1", public_key=CLUSTER_KEY)
    net.form()
    c1 = net.add("c1", role="client", data_dir=None, public_key=KEYS["c1"])  # never introduced: no view
    token = c1.command(ServeService("svc.echo"))
    net.run(1.0)
    assert token not in c1.resolved
    net.run(1.2)
    assert c1.resolved.get(token, "missing") is None and "svc.echo" in c1.core.rpc.served


def test_work_held_for_the_view_fails_when_the_node_stops_and_never_runs_after():
    net = Net("n1", public_key=CLUSTER_KEY)
    net.form()
    c1 = net.add("c1", role="client", data_dir=None, public_key=KEYS["c1"])  # never introduced: no view
    serve, sub = c1.command(ServeService("svc.echo")), c1.command(AddSubscription(1, "events.>", None))
    net.run(0.5)
    assert serve not in c1.resolved and sub not in c1.resolved  # both held: no view yet
    c1.apply(c1.core.stop(c1.clock.now_s))
    assert isinstance(c1.failed.get(serve), NodeStoppedError) and isinstance(c1.failed.get(sub), NodeStoppedError)
    net.run(2.0)  # their VIEW_WAIT_S deadlines pass: nothing held is left to run
    assert serve not in c1.resolved and sub not in c1.resolved
    assert not c1.core.rpc.served and not c1.core.pubsub.local
