"""Request/reply: services offered by nodes and requests to them (``meshq.core.rpc.room``)."""
