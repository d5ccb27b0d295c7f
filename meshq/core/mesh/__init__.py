"""The mesh room: membership, liveness, gossip and seeds (``gossip.Mesh``)."""
