"""The client rooms: what a node does for its own API calls: topic metadata (``metadata``),
producing (``producer``) and the other requests (``requests``)."""
