"""The live view: what ``memhp watch``, ``memhp map``, the timeline and ``memhp demo`` show.

:mod:`memhp.view.model` holds what is known about every VM, fed by
:mod:`memhp.view.grpc_source` (the hypervisor's Control service and each guest's
introspection) or :mod:`memhp.view.mqtt_source` (the retained MQTT documents and the
event topics); :mod:`memhp.view.render` draws it in the terminal,
:mod:`memhp.view.svg` as a picture and :mod:`memhp.view.timeline` plots memory over
time. Nothing here imports ``guest`` or ``hypervisor``: the view reads the wire only.
"""
