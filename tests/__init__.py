import os

# gRPC's fork handlers (grpcio enables them by default) run in any child forked while
# gRPC threads are busy and can kill it before it execs: ManagedRedis forks (it sets
# PDEATHSIG between fork and exec), and tests restart Redis while gateways serve in the
# test process, so a redis-server now and then "exited with status -6" (or -11) with an
# epoll error from gRPC in its log. No test forks to use gRPC in the child; this must be
# set before grpc is first imported, hence here (the package runs before any conftest).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
