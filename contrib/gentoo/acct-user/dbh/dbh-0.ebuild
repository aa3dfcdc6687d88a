# Copyright 2026 Gentoo Authors
# Distributed under the terms of the GNU General Public License v2

EAPI=8

inherit acct-user

DESCRIPTION="User for the dbh binhost server (dbh serve runs as it and only reads)"
# -1: any free id (an overlay has no id of its own in ::gentoo's uid-gid.txt).
ACCT_USER_ID=-1
ACCT_USER_GROUPS=( dbh )
# No home: $DBH_HOME (/var/lib/dbh) stays root's, so the server cannot write the binhosts.

acct-user_add_deps
