#!/bin/sh
# Remove grapheon-agent: stop and remove the units, the releases and the command link.
# The state directory (agent identity, API key) and the env file are kept unless
# --purge-state / --purge-config ask otherwise, so a re-install needs no new enrollment.
#   sh /opt/grapheon/agent/current/scripts/uninstall.sh [--purge-state] [--purge-config]
#
# All the work, and every option (--root, --prefix, --systemctl, ...), is in install.sh beside
# this file; --help lists them.
set -eu
here=$(dirname "$0")
set -- --mode uninstall "$@"
# shellcheck source-path=SCRIPTDIR source=install.sh
. "$here/install.sh"
