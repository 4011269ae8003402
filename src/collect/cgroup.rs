//! Who a process belongs to, read from its `/proc/<pid>/cgroup`: the container runtime, the
//! container id, the Kubernetes pod and the systemd unit, as each runtime names its cgroups.
//!
//! Path shapes recognised (cgroup v2 `0::<path>` and every v1 hierarchy line), deepest
//! component first:
//!
//! | runtime | systemd driver | cgroupfs driver |
//! |---|---|---|
//! | docker | `docker-<id>.scope` | `/docker/<id>` |
//! | containerd (CRI, nerdctl) | `cri-containerd-<id>.scope`, `nerdctl-<id>.scope` | `/kubepods/<qos>/pod<uid>/<id>` |
//! | cri-o | `crio-<id>.scope` | `crio-<id>` |
//! | podman (libpod) | `libpod-<id>.scope` | `/libpod_parent/libpod-<id>` |
//! | lxc / lxd | | `lxc.payload.<name>`, `/lxc/<name>` |
//! | systemd-nspawn | `systemd-nspawn@<name>.service`, `machine-<name>.scope` | |
//! | systemd service | `<name>.service` | |
//!
//! The pod UID comes from `kubepods-<qos>-pod<uid>.slice` (systemd, `_` for `-`) or
//! `pod<uid>` (cgroupfs). `<id>` is 64 hex digits. Anything else is unattributed.

use std::fmt;

/// The software that made a process's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Runtime {
    Docker,
    Containerd,
    CriO,
    Podman,
    Lxc,
    Nspawn,
    Systemd,
}

impl Runtime {
    /// The name reported in `metadata.namespaces`.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Podman => "podman",
            Runtime::Lxc => "lxc",
            Runtime::Nspawn => "systemd-nspawn",
            Runtime::Systemd => "systemd",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a cgroup path says about its process. `name` is the LXC container, nspawn machine or
/// systemd unit name; `container_id` the runtime's 64-hex id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attribution {
    pub runtime: Option<Runtime>,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    pub name: Option<String>,
}

impl Attribution {
    /// How much the attribution tells: a container beats a machine, which beats a service.
    fn rank(&self) -> u8 {
        let runtime = match self.runtime {
            None => 0,
            Some(Runtime::Systemd) => 1,
            Some(Runtime::Lxc | Runtime::Nspawn) => 2,
            Some(_) if self.container_id.is_some() => 3,
            Some(_) => 2,
        };
        runtime * 2 + u8::from(self.pod_uid.is_some())
    }
}

/// The attribution of the text of one `/proc/<pid>/cgroup`: the most telling of its lines,
/// the cgroup v2 line (`0::`) first on a tie. Unreadable lines are skipped.
pub fn attribute(text: &str) -> Attribution {
    // Starting from the v2 line, a v1 line replaces it only when it tells strictly more.
    let v2 = text.lines().find_map(|l| l.strip_prefix("0::"));
    let mut best = v2.map(from_path).unwrap_or_default();
    for path in text.lines().filter_map(path_of) {
        let candidate = from_path(path);
        if candidate.rank() > best.rank() {
            best = candidate;
        }
    }
    best
}

/// The path of one `hierarchy-id:controllers:path` line.
fn path_of(line: &str) -> Option<&str> {
    let mut fields = line.splitn(3, ':');
    let id = fields.next()?;
    fields.next()?;
    let path = fields.next()?;
    (id.bytes().all(|b| b.is_ascii_digit()) && path.starts_with('/')).then_some(path)
}

/// The attribution of one cgroup path.
pub fn from_path(path: &str) -> Attribution {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != "..")
        .collect();
    let pod_uid = parts.iter().find_map(|p| pod_uid(p));
    let mut container = None;
    for (i, part) in parts.iter().enumerate().rev() {
        let parent = i.checked_sub(1).map(|p| parts[p]);
        if let Some(found) = container_of(part, parent, pod_uid.is_some()) {
            container = Some(found);
            break;
        }
    }
    let (runtime, container_id, name) = match container {
        Some(found) => found,
        // A unit with a private network (`PrivateNetwork=yes`, `JoinsNamespaceOf=`); the
        // deepest service is the one the process runs in (`user@1000.service` holds others).
        None => match parts
            .iter()
            .rev()
            .find_map(|p| p.strip_suffix(".service"))
            .filter(|n| !n.is_empty())
        {
            Some(unit) => (
                Some(Runtime::Systemd),
                None,
                Some(unescape(&format!("{unit}.service"))),
            ),
            None => (None, None, None),
        },
    };
    Attribution {
        runtime,
        container_id,
        pod_uid,
        name,
    }
}

type Found = (Option<Runtime>, Option<String>, Option<String>);

/// The container one path component names, given its parent component.
fn container_of(part: &str, parent: Option<&str>, in_pod: bool) -> Option<Found> {
    let scoped = |prefix: &str| -> Option<String> {
        let id = part.strip_prefix(prefix)?;
        let id = id.strip_suffix(".scope").unwrap_or(id);
        is_id(id).then(|| id.to_string())
    };
    let container = |runtime, id| Some((Some(runtime), Some(id), None));
    if let Some(id) = scoped("docker-") {
        return container(Runtime::Docker, id);
    }
    if let Some(id) = scoped("cri-containerd-").or_else(|| scoped("nerdctl-")) {
        return container(Runtime::Containerd, id);
    }
    if let Some(id) = scoped("crio-") {
        return container(Runtime::CriO, id);
    }
    if let Some(id) = scoped("libpod-") {
        return container(Runtime::Podman, id);
    }
    if is_id(part) {
        return match parent {
            Some("docker") => container(Runtime::Docker, part.to_string()),
            Some("libpod_parent") => container(Runtime::Podman, part.to_string()),
            // kubelet's cgroupfs driver names the container by its bare id inside the pod.
            _ if in_pod => container(Runtime::Containerd, part.to_string()),
            _ => None,
        };
    }
    if let Some(name) = part
        .strip_prefix("lxc.payload.")
        .or_else(|| (parent == Some("lxc")).then_some(part))
        .filter(|n| !n.is_empty())
    {
        return Some((Some(Runtime::Lxc), None, Some(name.to_string())));
    }
    if let Some(name) = part
        .strip_prefix("systemd-nspawn@")
        .and_then(|n| n.strip_suffix(".service"))
        .or_else(|| {
            part.strip_prefix("machine-")
                .and_then(|n| n.strip_suffix(".scope"))
        })
        .filter(|n| !n.is_empty())
    {
        return Some((Some(Runtime::Nspawn), None, Some(unescape(name))));
    }
    None
}

/// A 64-digit lowercase hex container id.
fn is_id(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The pod UID of `kubepods-besteffort-pod<uid>.slice`, `kubepods-pod<uid>.slice` (systemd
/// driver: `_` stands for `-`) or `pod<uid>` (cgroupfs driver).
fn pod_uid(part: &str) -> Option<String> {
    let uid = match part.strip_suffix(".slice") {
        Some(slice) if slice.starts_with("kubepods-") => {
            slice.rsplit_once("-pod").map(|(_, uid)| uid)?
        }
        Some(_) => return None,
        None => part.strip_prefix("pod")?,
    };
    let uid = uid.replace('_', "-");
    let groups: Vec<&str> = uid.split('-').collect();
    let shape = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]);
    let hex = uid
        .bytes()
        .all(|b| b == b'-' || b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    (shape && hex).then_some(uid)
}

/// Undoes systemd's unit-name escaping of `-` and other bytes (`\x2d`), for names only.
fn unescape(name: &str) -> String {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && bytes.get(i + 1) == Some(&b'x') {
            let value = bytes
                .get(i + 2..i + 4)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(v) = value {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1b1e8c0a5e4b0b9d7c6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b";
    const UID: &str = "7c0c4a3e-5f0b-4e3a-9a6b-2d1c0e9f8b7a";

    fn found(
        runtime: Runtime,
        id: Option<&str>,
        pod: Option<&str>,
        name: Option<&str>,
    ) -> Attribution {
        Attribution {
            runtime: Some(runtime),
            container_id: id.map(String::from),
            pod_uid: pod.map(String::from),
            name: name.map(String::from),
        }
    }

    #[test]
    fn every_runtime_path_shape_is_attributed() {
        let uid_ = UID.replace('-', "_");
        let cases: Vec<(String, Attribution)> = vec![
            (
                format!("/system.slice/docker-{ID}.scope"),
                found(Runtime::Docker, Some(ID), None, None),
            ),
            (
                format!("/docker/{ID}"),
                found(Runtime::Docker, Some(ID), None, None),
            ),
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"),
                found(Runtime::Containerd, Some(ID), Some(UID), None),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{ID}.scope"),
                found(Runtime::Containerd, Some(ID), Some(UID), None),
            ),
            (
                format!("/kubepods/besteffort/pod{UID}/{ID}"),
                found(Runtime::Containerd, Some(ID), Some(UID), None),
            ),
            (
                format!("/kubepods/pod{UID}/{ID}"),
                found(Runtime::Containerd, Some(ID), Some(UID), None),
            ),
            (
                format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/crio-{ID}.scope"),
                found(Runtime::CriO, Some(ID), Some(UID), None),
            ),
            (
                format!("/kubepods/besteffort/pod{UID}/crio-{ID}"),
                found(Runtime::CriO, Some(ID), Some(UID), None),
            ),
            (
                format!("/machine.slice/libpod-{ID}.scope"),
                found(Runtime::Podman, Some(ID), None, None),
            ),
            (
                format!("/machine.slice/libpod-{ID}.scope/container"),
                found(Runtime::Podman, Some(ID), None, None),
            ),
            (
                format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"),
                found(Runtime::Podman, Some(ID), None, None),
            ),
            (
                format!("/libpod_parent/libpod-{ID}"),
                found(Runtime::Podman, Some(ID), None, None),
            ),
            (
                format!("/system.slice/nerdctl-{ID}.scope"),
                found(Runtime::Containerd, Some(ID), None, None),
            ),
            (
                "/lxc.payload.web01".into(),
                found(Runtime::Lxc, None, None, Some("web01")),
            ),
            (
                "/lxc/web01".into(),
                found(Runtime::Lxc, None, None, Some("web01")),
            ),
            (
                "/machine.slice/systemd-nspawn@build\\x2dbox.service/payload".into(),
                found(Runtime::Nspawn, None, None, Some("build-box")),
            ),
            (
                "/machine.slice/machine-build\\x2dbox.scope".into(),
                found(Runtime::Nspawn, None, None, Some("build-box")),
            ),
            (
                "/system.slice/isolated\\x2dweb.service".into(),
                found(Runtime::Systemd, None, None, Some("isolated-web.service")),
            ),
            (
                "/user.slice/user-1000.slice/user@1000.service/app.slice/sync.service".into(),
                found(Runtime::Systemd, None, None, Some("sync.service")),
            ),
            // Seen from inside another cgroup namespace (an agent in a container).
            (
                format!("/../../docker-{ID}.scope"),
                found(Runtime::Docker, Some(ID), None, None),
            ),
        ];
        for (path, want) in cases {
            assert_eq!(from_path(&path), want, "{path}");
        }
    }

    #[test]
    fn unknown_shapes_and_near_misses_are_unattributed() {
        for path in [
            "/",
            "/user.slice/user-0.slice/session-3.scope",
            "/init.scope",
            "/docker/abc",
            &format!("/docker/{}", ID.to_uppercase()),
            &format!("/system.slice/docker-{}.scope", &ID[1..]),
            &format!("/somewhere/{ID}"),
            "/kubepods/besteffort/podnot-a-uid",
            "/lxc.payload.",
            "/machine.slice/machine-.scope",
        ] {
            assert_eq!(from_path(path), Attribution::default(), "{path}");
        }
        // A pod without a recognisable container still names its pod.
        assert_eq!(
            from_path(&format!("/kubepods/burstable/pod{UID}")),
            Attribution {
                pod_uid: Some(UID.into()),
                ..Attribution::default()
            }
        );
    }

    #[test]
    fn the_most_telling_line_wins_v1_and_v2() {
        // cgroup v1 with the cgroupfs driver: the v2 line says nothing, the controllers do.
        let v1 = format!(
            "12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/\n"
        );
        assert_eq!(attribute(&v1), found(Runtime::Docker, Some(ID), None, None));
        // Pure v2.
        let v2 = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(attribute(&v2), found(Runtime::Docker, Some(ID), None, None));
        // Hybrid: the v2 line has a service, a v1 line the container; the container wins.
        let hybrid = format!(
            "9:name=systemd:/system.slice/containerd.service\n8:pids:/kubepods/burstable/pod{UID}/{ID}\n0::/system.slice/containerd.service\n"
        );
        assert_eq!(
            attribute(&hybrid),
            found(Runtime::Containerd, Some(ID), Some(UID), None)
        );
        assert_eq!(attribute(""), Attribution::default());
        assert_eq!(attribute("garbage\n::\nx:y\n"), Attribution::default());
    }
}
