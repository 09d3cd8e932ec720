"""The Linux memory-manager model: pure, no I/O, no asyncio, nothing of the project outside it.

(The one exception is the ``extents`` leaf package, a pure data structure.)
"""
