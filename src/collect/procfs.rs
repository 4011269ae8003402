//! `/proc` text: `/proc/net/{tcp,tcp6,udp,udp6}` sockets and socket owners from `/proc/<pid>/fd`.
