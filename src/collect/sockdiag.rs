//! `NETLINK_SOCK_DIAG` (inet_diag): TCP and UDP sockets straight from the kernel.
