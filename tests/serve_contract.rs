//! The fake Graphēon server of `tests/support` as a process of its own, driven through files.
//!
//! `tests/packaging/systemd.sh` boots Debian with systemd in a container and needs a server on
//! the container's loopback that the installed agent registers and checks in with. It copies this
//! test binary in and runs it with `GRAPHEON_CONTRACT_SERVE_DIR=DIR`: the one test below then
//! serves until told to stop. Without that variable the test proves the file protocol itself.
//!
//! The protocol, all files in DIR (written atomically, by rename):
//! - `url` (written by the server once it listens): its base URL on 127.0.0.1;
//! - `agents` (server): one `UUID STATE` line per registered agent, in registration order;
//! - `checkins` (server): per accepted check-in, `checkin UUID full_snapshot=B connections=N`, then
//!   `  PROTOCOL LOCAL_IP:LOCAL_PORT STATE PROCESS_NAME PID` for each connection that has an owner,
//!   then `  namespace PID PROCESS_NAME RUNTIME NAME ADDRESS,...` for each entry of
//!   `metadata.namespaces.list` (`-` for a null or empty field);
//! - `approve` (driver): UUID lines to approve; the server removes the file once done;
//! - `stop` (driver): the server exits.
//!
//! The enrollment key is `GRAPHEON_CONTRACT_ENROLLMENT_KEY` (default [`ENROLLMENT_KEY`]).

mod support;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use support::json as j;
use support::{ContractServer, Endpoint, EnrollmentKey};

/// The key of the captured registration sample, used when the driver names none.
const ENROLLMENT_KEY: &str = "gaek_EXAMPLEonlyEXAMPLEonlyEXAMPLEonly000000";
/// How often the server looks for commands and refreshes its files.
const POLL: Duration = Duration::from_millis(50);

/// Writes `text` to `dir/name` so that a reader sees the old or the new content, never half.
fn publish(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    fs::rename(&tmp, dir.join(name)).unwrap_or_else(|e| panic!("publish {name}: {e}"));
}

/// The `agents` file: registered uuids (first registration order) with their state.
fn agents_text(server: &ContractServer) -> String {
    let mut uuids: Vec<String> = Vec::new();
    for request in server.requests_to(Endpoint::Register) {
        let body = String::from_utf8_lossy(&request.body);
        let Ok(value) = miniserde::json::from_str::<miniserde::json::Value>(&body) else {
            continue;
        };
        if let Some(uuid) = j::str_at(&value, "agent_uuid") {
            if !uuids.iter().any(|u| u == uuid) {
                uuids.push(uuid.to_string());
            }
        }
    }
    let mut text = String::new();
    for uuid in uuids {
        if let Some(state) = server.agent_state(&uuid) {
            text.push_str(&format!("{uuid} {}\n", state.as_str()));
        }
    }
    text
}

/// The `checkins` file: what each accepted check-in said about sockets and their owners.
fn checkins_text(server: &ContractServer) -> String {
    let mut text = String::new();
    for checkin in server.checkins() {
        let connections: &[miniserde::json::Value] = match j::get(&checkin.json, "connections") {
            Some(miniserde::json::Value::Array(list)) => list,
            _ => &[],
        };
        let full = j::bool_at(&checkin.json, "full_snapshot").unwrap_or(false);
        text.push_str(&format!(
            "checkin {} full_snapshot={full} connections={}\n",
            checkin.agent_uuid,
            connections.len()
        ));
        for c in connections {
            if let Some(name) = j::str_at(c, "process_name") {
                text.push_str(&format!(
                    "  {} {}:{} {} {name} {}\n",
                    j::str_at(c, "protocol").unwrap_or("?"),
                    j::str_at(c, "local_ip").unwrap_or("?"),
                    j::u64_at(c, "local_port").unwrap_or(0),
                    j::str_at(c, "state").unwrap_or("-"),
                    j::u64_at(c, "pid").map_or("-".to_string(), |p| p.to_string()),
                ));
            }
        }
        if let Some(miniserde::json::Value::Array(list)) =
            j::get(&checkin.json, "metadata.namespaces.list")
        {
            for n in list {
                text.push_str(&namespace_line(n));
            }
        }
    }
    text
}

/// One `metadata.namespaces.list` entry as a line of the `checkins` file.
fn namespace_line(entry: &miniserde::json::Value) -> String {
    let field = |key: &str| {
        j::str_at(entry, key)
            .filter(|s| !s.is_empty())
            .unwrap_or("-")
    };
    let addresses: Vec<&str> = match j::get(entry, "addresses") {
        Some(miniserde::json::Value::Array(list)) => list
            .iter()
            .filter_map(|a| match a {
                miniserde::json::Value::String(s) => Some(s.as_str()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    format!(
        "  namespace {} {} {} {} {}\n",
        j::u64_at(entry, "pid").map_or("-".to_string(), |p| p.to_string()),
        field("process_name"),
        field("runtime"),
        field("name"),
        if addresses.is_empty() {
            "-".to_string()
        } else {
            addresses.join(",")
        },
    )
}

/// Serves on 127.0.0.1 until `dir/stop` appears, acting on the commands described above.
fn serve(dir: &Path, enrollment_key: &str) {
    let server = ContractServer::start();
    server.add_enrollment_key(enrollment_key, EnrollmentKey::default());
    publish(dir, "agents", "");
    publish(dir, "checkins", "");
    publish(dir, "url", &format!("{}\n", server.url()));
    let (mut agents, mut checkins) = (String::new(), String::new());
    while !dir.join("stop").exists() {
        let approve = dir.join("approve");
        if let Ok(text) = fs::read_to_string(&approve) {
            for uuid in text.split_whitespace() {
                server.approve(uuid);
            }
            fs::remove_file(&approve).expect("remove the approve file");
        }
        // Rewritten only on change, so that a driver polling them sees few renames.
        let now = agents_text(&server);
        if now != agents {
            publish(dir, "agents", &now);
            agents = now;
        }
        let now = checkins_text(&server);
        if now != checkins {
            publish(dir, "checkins", &now);
            checkins = now;
        }
        thread::sleep(POLL);
    }
    drop(server);
}

/// A raw HTTP/1.1 POST with `Connection: close`: the status code and the body.
fn post(url: &str, path: &str, body: &str) -> (u16, String) {
    let addr = url.trim_start_matches("http://").trim_end();
    let mut stream = TcpStream::connect(addr).expect("connect to the served fake");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send the request");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read the reply");
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {reply:?}"));
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// Waits up to 10 s for `dir/name` to hold `expected`; returns what it last held.
fn wait_for_file(dir: &Path, name: &str, expected: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = fs::read_to_string(dir.join(name)).unwrap_or_default();
        if text == expected || Instant::now() > deadline {
            return text;
        }
        thread::sleep(POLL);
    }
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("serve-contract-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create the control directory");
    dir
}

#[test]
fn served_fake_registers_approves_on_command_and_stops() {
    if let Some(dir) = std::env::var_os("GRAPHEON_CONTRACT_SERVE_DIR") {
        let key = std::env::var("GRAPHEON_CONTRACT_ENROLLMENT_KEY")
            .unwrap_or_else(|_| ENROLLMENT_KEY.to_string());
        serve(Path::new(&dir), &key);
        return;
    }
    let dir = temp_dir();
    let for_thread = dir.clone();
    let served = thread::spawn(move || serve(&for_thread, ENROLLMENT_KEY));
    let url = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(url) = fs::read_to_string(dir.join("url")) {
                break url;
            }
            assert!(Instant::now() < deadline, "the server wrote no url file");
            thread::sleep(POLL);
        }
    };
    let sample = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/contract/registration-request.json"),
    )
    .expect("registration sample");
    let uuid = j::str_at(&j::parse(&sample), "agent_uuid")
        .expect("sample uuid")
        .to_string();

    let (status, body) = post(&url, "/api/agents/register", &sample);
    assert_eq!(
        (status, j::str_at(&j::parse(&body), "status")),
        (200, Some("pending"))
    );
    assert_eq!(
        wait_for_file(&dir, "agents", &format!("{uuid} pending\n")),
        format!("{uuid} pending\n")
    );

    publish(&dir, "approve", &format!("{uuid}\n"));
    assert_eq!(
        wait_for_file(&dir, "agents", &format!("{uuid} active\n")),
        format!("{uuid} active\n")
    );
    assert!(
        !dir.join("approve").exists(),
        "the approve file was not consumed"
    );
    let (status, body) = post(&url, "/api/agents/register", &sample);
    let reply = j::parse(&body);
    assert_eq!((status, j::str_at(&reply, "status")), (200, Some("active")));
    assert!(j::str_at(&reply, "api_key").is_some_and(|k| k.starts_with("gpak_")));
    assert_eq!(fs::read_to_string(dir.join("checkins")).unwrap(), "");

    publish(&dir, "stop", "");
    served.join().expect("the serve loop ends on stop");
    fs::remove_dir_all(&dir).expect("remove the control directory");
}

#[test]
fn namespace_entry_becomes_one_line_with_dashes_for_null_fields() {
    let entry = j::parse(
        r#"{"inode":4026532300,"pid":42,"process_name":"perl","runtime":"systemd","container_id":null,
            "pod_uid":null,"name":"ns-listener.service","addresses":["10.213.77.2","fd00::2"],
            "sockets":1,"connections":1,"loopback_left_out":0}"#,
    );
    assert_eq!(
        namespace_line(&entry),
        "  namespace 42 perl systemd ns-listener.service 10.213.77.2,fd00::2\n"
    );
    let bare =
        j::parse(r#"{"pid":7,"process_name":"sleep","runtime":null,"name":null,"addresses":[]}"#);
    assert_eq!(namespace_line(&bare), "  namespace 7 sleep - - -\n");
}
