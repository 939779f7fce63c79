#!/usr/bin/env bash
# Install the system packages meshd needs on Debian 12 (bookworm), as root.
#
# Consul 1.8.7 is packaged only in Debian bullseye. We add bullseye with the same
# mirror URIs this machine already uses for bookworm (read from debian.sources, never
# written in here), and pin every bullseye package below bookworm except `consul`,
# so nothing else (libc above all) is upgraded from the older suite.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install-system.sh: must run as root" >&2
    exit 1
fi

# Everything already there: nothing to do (keeps repeated test runs fast).
needed="consul iptables iptables-restore ip6tables-restore ip tcpdump nginx curl python3"
missing=0
for cmd in $needed; do command -v "$cmd" >/dev/null 2>&1 || missing=1; done
if [ "$missing" -eq 0 ] && python3 -c 'import venv, ensurepip' 2>/dev/null; then
    exit 0
fi

sources=/etc/apt/sources.list.d/debian.sources
list=/etc/apt/sources.list.d/meshd-bullseye.sources
pin=/etc/apt/preferences.d/meshd-bullseye

if ! command -v consul >/dev/null 2>&1; then
    if [ ! -f "$list" ] && [ ! -f "$sources" ]; then
        echo "install-system.sh: $sources not found: this script reads the mirror to add" \
            "Debian bullseye (for consul) from a deb822 sources file, as Debian 12 images" \
            "ship it; write the bookworm entries of /etc/apt/sources.list there in deb822 form" >&2
        exit 1
    fi
    if [ ! -f "$list" ]; then
        # The URIs of the stanza that carries the plain `bookworm` suite.
        uris=$(awk '
            /^[[:space:]]*$/ { if (main && u != "") { print u; exit } u=""; main=0; next }
            /^URIs:/ { sub(/^URIs:[[:space:]]*/, ""); u=$0 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") main=1 }
            END { if (main && u != "") print u }
        ' "$sources" | head -n 1)
        keyring=$(awk '/^Signed-By:/ { print $2; exit }' "$sources")
        if [ -z "$uris" ]; then
            echo "install-system.sh: no bookworm URIs found in $sources" >&2
            exit 1
        fi
        printf 'Types: deb\nURIs: %s\nSuites: bullseye\nComponents: main\nSigned-By: %s\n' \
            "$uris" "${keyring:-/usr/share/keyrings/debian-archive-keyring.gpg}" >"$list"
    fi
    cat >"$pin" <<'PIN'
# meshd: take only consul from bullseye; everything else stays on bookworm.
Package: *
Pin: release n=bullseye
Pin-Priority: 100

Package: consul
Pin: release n=bullseye
Pin-Priority: 600
PIN
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    consul iptables iproute2 tcpdump nginx-light procps curl ca-certificates \
    python3 python3-venv >/dev/null
# nginx-light is a test and benchmark fixture only: it must not hold port 80 on the host,
# now or after a reboot. (Without systemd running, as in a container, it was not started.)
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now --quiet nginx
fi
# sed reads all of it: with `head -n 1`, consul could die of SIGPIPE, failing pipefail.
consul version | sed -n 1p
