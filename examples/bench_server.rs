//! The contract test server (`tests/support`) as a process of its own, for `scripts/bench.sh`:
//! full and delta check-ins are measured against it. It auto-approves the tests' enrollment key,
//! answers like the real server, and runs until killed.
//!
//!   bench_server <listen-address> <url-file>
//!       Listens on <listen-address> (e.g. `198.51.100.2:8080`) and writes its URL to
//!       <url-file> once it accepts connections.

#[path = "../tests/support/mod.rs"]
mod support;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, url_file] = args.as_slice() else {
        eprintln!("usage: bench_server <listen-address> <url-file>");
        std::process::exit(2);
    };
    let srv = support::ContractServer::start_on(addr);
    srv.add_enrollment_key(
        support::agent::ENROLLMENT_KEY,
        support::EnrollmentKey::auto_approve(),
    );
    std::fs::write(url_file, srv.url()).expect("write the URL file");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
