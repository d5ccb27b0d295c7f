"""The partition rooms: the local replicas (``host``), the requests their leaders serve
(``server``) and consumer-group offsets (``groups``)."""
