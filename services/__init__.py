"""mso: MineStudio online RL training as gRPC services (rollout, trainer, launcher) with Redis between them."""

import os

# Before anything imports grpc (it reads this once, when it loads): no gRPC fork handlers in our processes.
# A service starts its Ray instance's processes (Ray's Popen with a preexec_fn: a real fork) while its gRPC
# server answers calls; with the handlers on, which grpcio's core has by default, the forked child restarted
# gRPC's threads and died of SIGSEGV/SIGABRT before exec (about 1 fork in 50 under calls), so Ray's GCS or
# raylet never started and the Start failed after Ray's wait, while the handlers also closed file descriptors
# the server still used. No child of ours uses the parent's gRPC: each exec()s, or builds its own channels.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"
