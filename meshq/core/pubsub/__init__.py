"""Ephemeral pub/sub: subjects and patterns, the interest matcher, and the room that routes."""
