"""Scenario files and the runners that play them (the top of ``memhp``: wires both sides)."""
