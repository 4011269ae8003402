#!/bin/sh
# Upgrade grapheon-agent: install a newer release beside the current one, switch to it,
# keep the previous release and print the command that rolls back to it.
#   sh /opt/grapheon/agent/current/scripts/upgrade.sh --base-url URL | --tarball FILE
#
# All the work, and every option (--root, --prefix, --systemctl, ...), is in install.sh beside
# this file; --help lists them.
set -eu
here=$(dirname "$0")
set -- --mode upgrade "$@"
# shellcheck source-path=SCRIPTDIR source=install.sh
. "$here/install.sh"
