//! Netlink refused to one started program, as a sandbox or a seccomp profile refuses it, so that
//! a test can make the agent's `/proc` fallback serve on a kernel that would answer netlink.
//! Needs no privilege: `PR_SET_NO_NEW_PRIVS` comes first, and the filter is inherited across
//! `exec` (by `ip netns exec` and then the agent).
#![cfg(all(
    target_endian = "little",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]

use std::os::unix::process::CommandExt;
use std::process::Command;

use libc::{sock_filter, BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W};

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// Makes `socket(AF_NETLINK, _, protocol)` fail with EACCES in the program `cmd` starts: every
/// netlink protocol when `protocol` is `None`. Everything else is allowed.
pub fn refuse_netlink(cmd: &mut Command, protocol: Option<u32>) {
    // struct seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 i (the low half first, on
    // the little-endian targets this is compiled for).
    let mut checks = vec![
        (4, AUDIT_ARCH),
        (0, libc::SYS_socket as u32),
        (16, libc::AF_NETLINK as u32),
    ];
    if let Some(p) = protocol {
        checks.push((32, p));
    }
    let op = |code: u32, jt: u8, jf: u8, k: u32| sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    // Each check loads a word and jumps to the final ALLOW when it differs; all equal: refuse.
    let n = checks.len();
    let mut filter = Vec::with_capacity(2 * n + 2);
    for (i, (offset, value)) in checks.into_iter().enumerate() {
        filter.push(op(BPF_LD | BPF_W | BPF_ABS, 0, 0, offset));
        let to_allow = u8::try_from(2 * (n - i) - 1).expect("short filter");
        filter.push(op(BPF_JMP | BPF_JEQ | BPF_K, 0, to_allow, value));
    }
    filter.push(op(
        BPF_RET | BPF_K,
        0,
        0,
        libc::SECCOMP_RET_ERRNO | libc::EACCES as u32,
    ));
    filter.push(op(BPF_RET | BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW));
    // SAFETY: the closure runs between fork and exec and makes only two prctl system calls
    // (async-signal-safe); `filter` is moved into it and outlives them.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
