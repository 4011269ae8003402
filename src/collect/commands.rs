//! The earlier agent's sources: `ip -json addr|neigh|route show`, `ss -tunapH`, `netstat -tunap`.
