# The egress node agent's image: `cargo xtask image` builds the release binaries, stages them
# beside this file and runs `docker build` (where the base image cannot be pulled, it makes
# debian:bookworm-slim from Debian's packages first). The binaries link glibc dynamically: build
# them on bookworm (or older) for this base.
FROM debian:bookworm-slim
# `egress` (the agent and its commands) and `egress-cni`, which `egress cni install` copies
# into the node's CNI bin directory. nsenter, mount and stat, which the DaemonSet uses, come
# with the base.
COPY egress egress-cni /usr/local/bin/
CMD ["egress", "--help"]
