"""What both sides share: DM messages, units, logging, and (at the top) the CLI and scenarios.

Importing the package also picks the gRPC transport of every ``memhp`` process (the
package runs before anything in it imports ``grpc``). Since grpcio 1.6x the TCP client
and listener run on gRPC's EventEngine, which reads a socket on one of its own threads
and hands each message on through another before ``grpc.aio``'s poller wakes the event
loop. The older poller reads the socket on the completion-queue thread itself. A DM
stream is a ping-pong of small messages, one transaction after the other, so those
hand-offs are most of its cost: on the 2-core machine of the README's figures, a bare
``grpc.aio`` ping-pong between two processes runs at about 3,500 round trips/s with the
EventEngine and 6,000 with the older poller, and a batch of Hyper-V hot-adds between a
``memhp hypervisor`` and a ``memhp guest`` at about 1,550/s and 2,000/s.

So, unless ``GRPC_EXPERIMENTS`` is already set, ``memhp`` sets it to disable the two
EventEngine experiments (``event_engine_client``, ``event_engine_listener``) for itself
and the processes it starts. ``GRPC_EXPERIMENTS=`` (empty) keeps gRPC's defaults. gRPC
reads the variable when it is imported, so this must stay above any ``grpc`` import.
A program that imports ``memhp`` as a library gets the same setting (if it has not
imported ``grpc`` yet), and so do its children. A grpcio that no longer knows these
experiments logs that at start and runs with its own transport.
"""

import os

#: The gRPC experiments ``memhp`` turns off when ``GRPC_EXPERIMENTS`` is not set.
GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"

os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
