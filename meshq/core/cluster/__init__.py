"""The cluster rooms: the metadata group (``agreement``), joining or forming it (``formation``),
leaving it (``leave``), and the topic catalog it agrees on (``catalog``)."""
