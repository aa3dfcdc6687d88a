# Copyright 2026 Gentoo Authors
# Distributed under the terms of the GNU General Public License v2

EAPI=8

inherit acct-group

DESCRIPTION="Group for the dbh binhost server"
# -1: any free id (an overlay has no id of its own in ::gentoo's uid-gid.txt).
ACCT_GROUP_ID=-1
