//! The lifecycle of one run.

/// Runs the agent and returns the exit code.
pub fn main() -> i32 {
    0
}
