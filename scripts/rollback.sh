#!/bin/sh
# Roll grapheon-agent back to an installed release: switch the current symlink (atomically)
# and the systemd units back to it. The agent's state directory is not touched.
#   sh /opt/grapheon/agent/current/scripts/rollback.sh 0.1.0
#
# All the work, and every option (--root, --prefix, --systemctl, ...), is in install.sh beside
# this file; --help lists them.
set -eu
here=$(dirname "$0")
set -- --mode rollback "$@"
# shellcheck source-path=SCRIPTDIR source=install.sh
. "$here/install.sh"
