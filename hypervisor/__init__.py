"""The hypervisor side of memhp-emu: VM definitions, ground-truth backing and host state machines.

The protocol state machines here are sans-I/O (a message or a clock tick in, messages
to send and domain events out); gRPC servicers, timers and MQTT live in the process
adapters, never in these modules. Nothing here imports :mod:`guest`.
"""
