//! The collection policy the server sends, clamped to the documented ranges.
//!
//! The policy arrives in registration and check-in responses (and may be `null`); the last good
//! one is cached in `state.json`. Values outside the server's documented ranges are clamped, wrong
//! types fall back to the default, unknown keys are ignored: a bad policy never stops the agent.

use std::time::Duration;

use miniserde::json::Value;

use crate::collect::Tables;
use crate::json::{self, Object};

/// The policy fields the agent acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub checkin_interval_seconds: u32,
    pub jitter_seconds: u32,
    pub command_timeout_seconds: u32,
    pub tables: Tables,
    pub max_report_bytes: u32,
    pub is_active: bool,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            checkin_interval_seconds: 3_600,
            jitter_seconds: 300,
            command_timeout_seconds: 15,
            tables: Tables::default(),
            max_report_bytes: 262_144,
            is_active: true,
        }
    }
}

fn clamped(value: &Value, key: &str, min: u32, max: u32, default: u32) -> u32 {
    match json::get_i64(value, key) {
        Some(n) => n.clamp(i64::from(min), i64::from(max)) as u32,
        None => default,
    }
}

impl Policy {
    /// Reads a policy object; `None` when the value is not an object (e.g. `null`), so the caller
    /// keeps the last good policy.
    pub fn from_value(value: &Value) -> Option<Policy> {
        if !matches!(value, Value::Object(_)) {
            return None;
        }
        let d = Policy::default();
        let enabled = json::get(value, "enabled_commands");
        let table = |key: &str| enabled.and_then(|e| json::get_bool(e, key)).unwrap_or(true);
        Some(Policy {
            checkin_interval_seconds: clamped(
                value,
                "checkin_interval_seconds",
                60,
                86_400,
                d.checkin_interval_seconds,
            ),
            jitter_seconds: clamped(value, "jitter_seconds", 0, 3_600, d.jitter_seconds),
            command_timeout_seconds: clamped(
                value,
                "command_timeout_seconds",
                1,
                300,
                d.command_timeout_seconds,
            ),
            tables: Tables {
                addresses: table("ip_addr"),
                neighbors: table("ip_neigh"),
                routes: table("ip_route"),
                connections: table("ss_tunap"),
            },
            max_report_bytes: clamped(
                value,
                "max_report_bytes",
                16_384,
                10_485_760,
                d.max_report_bytes,
            ),
            is_active: json::get_bool(value, "is_active").unwrap_or(true),
        })
    }

    /// The policy as the JSON object cached in `state.json` (the server's key names).
    pub fn to_json(&self) -> String {
        let mut enabled = String::new();
        let mut e = Object::new(&mut enabled);
        e.num("ip_addr", self.tables.addresses)
            .num("ip_neigh", self.tables.neighbors)
            .num("ip_route", self.tables.routes)
            .num("ss_tunap", self.tables.connections);
        e.end();
        let mut out = String::new();
        let mut o = Object::new(&mut out);
        o.num("checkin_interval_seconds", self.checkin_interval_seconds)
            .num("jitter_seconds", self.jitter_seconds)
            .num("command_timeout_seconds", self.command_timeout_seconds)
            .raw("enabled_commands", &enabled)
            .num("max_report_bytes", self.max_report_bytes)
            .num("is_active", self.is_active);
        o.end();
        out
    }

    /// How long one external command may run.
    pub fn command_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.command_timeout_seconds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Option<Policy> {
        Policy::from_value(&miniserde::json::from_str::<Value>(text).unwrap())
    }

    #[test]
    fn server_policy_is_read_with_its_keys() {
        let p = parse(
            r#"{"name":"p","checkin_interval_seconds":60,"jitter_seconds":0,"command_timeout_seconds":15,
            "enabled_commands":{"ip_addr":true,"ip_neigh":false,"ip_route":true,"ss_tunap":true},
            "max_report_bytes":262144,"is_active":true,"id":1,"created_at":"2026-11-30T01:57:19.263789"}"#,
        )
        .unwrap();
        assert_eq!(
            p,
            Policy {
                checkin_interval_seconds: 60,
                jitter_seconds: 0,
                command_timeout_seconds: 15,
                tables: Tables {
                    addresses: true,
                    neighbors: false,
                    routes: true,
                    connections: true
                },
                max_report_bytes: 262_144,
                is_active: true,
            }
        );
    }

    #[test]
    fn out_of_range_values_are_clamped_and_wrong_types_defaulted() {
        let p = parse(
            r#"{"checkin_interval_seconds":5,"jitter_seconds":99999,"command_timeout_seconds":"x",
            "enabled_commands":"all","max_report_bytes":1e12,"is_active":null}"#,
        )
        .unwrap();
        assert_eq!(
            p,
            Policy {
                checkin_interval_seconds: 60,
                jitter_seconds: 3_600,
                command_timeout_seconds: 15,
                tables: Tables::default(),
                max_report_bytes: 10_485_760,
                is_active: true,
            }
        );
        assert_eq!(
            parse(r#"{"max_report_bytes":-3}"#)
                .unwrap()
                .max_report_bytes,
            16_384
        );
    }

    #[test]
    fn null_policy_means_keep_the_last_one() {
        assert_eq!(parse("null"), None);
        assert_eq!(parse("[]"), None);
    }

    #[test]
    fn cached_policy_round_trips() {
        let mut p = Policy::default();
        p.tables.routes = false;
        p.jitter_seconds = 7;
        assert_eq!(parse(&p.to_json()), Some(p));
    }
}
