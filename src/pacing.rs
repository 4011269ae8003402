//! How hard the agent may push the server, learned from the server itself and kept across runs
//! as the `pacing` member of `checkin.rec` (apart from `state.json`: losing it costs only what
//! was learned).
//!
//! Parts: a check-in part should take the server at most a third of the request timeout. A part
//! the agent gave up on may be stored anyway, and a second copy ingested next to the first one
//! corrupts the server (duplicate host rows), so a part must finish well before the agent gives
//! up. The agent measures the server's time per KiB of decoded JSON, sizes the next part to that
//! target, halves it after a part that got no answer, and grows it by half after fast answers,
//! never above the server's byte limits.
//!
//! Backoff: after failed runs, scheduled runs stay away for an exponentially growing, jittered
//! time capped at the policy interval, so a fleet that failed together does not come back
//! together. A part that got no answer also holds back every run, forced ones included, until
//! the server has had time to finish with it.

use std::time::Duration;

use miniserde::json::Value;

use crate::error::Result;
use crate::input;
use crate::json::{self, Object};
use crate::state::{Durability, StateDir};
use crate::timefmt;

/// The file in the state directory that keeps the pace (with the last check-in's fields).
pub const FILE: &str = crate::state::RECORD_FILE;
/// The decoded size of a part before anything is known about the server: a 256 KiB part took
/// a loaded server 62 s, a quarter of it fits the default 30 s timeout.
pub const START_PART_BYTES: u64 = 64 << 10;
/// Parts never get smaller than this (a few dozen records).
pub const MIN_PART_BYTES: u64 = 4 << 10;
/// Smaller parts say more about the server's fixed cost per request than about its time per
/// KiB, and compress worse than large ones: they are not used to learn either.
const MIN_SAMPLE_BYTES: u64 = 16 << 10;
/// After a part got no answer, nothing is sent until this many request timeouts after it was
/// sent: the server keeps ingesting after the agent gave up (62 s for a part that the agent gave
/// up on after 30 s).
const HOLD_TIMEOUTS: u32 = 4;
/// The shortest hold whatever the timeout: a loaded server took 62 s over one part, so a
/// 2 s timeout (an 8 s hold) would let the next run send while the first copy is stored.
const MIN_HOLD_SECONDS: u64 = 120;
/// The largest believable `gzip_permille`: gzip adds a few bytes per block to data it cannot
/// compress, so even random bytes stay below this; a larger saved value is damage.
const MAX_GZIP_PERMILLE: u64 = 1_100;
/// The longest backoff after repeated failures, in seconds, whatever the policy says.
const MAX_BACKOFF_SECONDS: u64 = 86_400;

/// What bounds a part in this run: the server's byte limits and the time it may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The policy's `max_report_bytes`: the largest decoded body the server accepts.
    pub max_decoded: u64,
    /// The largest raw (compressed) body the server accepts.
    pub max_raw: u64,
    /// The request timeout: how long the agent waits for an answer.
    pub timeout: Duration,
}

impl Limits {
    /// The time a part should take the server at most: a third of the request timeout.
    pub fn target(&self) -> Duration {
        self.timeout / 3
    }

    fn hold(&self) -> i64 {
        let hold = (self.timeout * HOLD_TIMEOUTS)
            .as_secs()
            .max(MIN_HOLD_SECONDS);
        i64::try_from(hold).unwrap_or(i64::MAX)
    }
}

/// How long scheduled runs stay away after failures: `base` after the first, doubling after
/// each further one, never above `cap` (the policy's check-in interval).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base_seconds: u64,
    pub cap_seconds: u64,
}

/// The server's answer to one accepted part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// When the answer came (epoch seconds).
    pub at: i64,
    /// Decoded bytes of the part.
    pub bytes: u64,
    /// Records in the part.
    pub records: u64,
    /// From sending the part to the answer.
    pub millis: u64,
}

/// A part that went out: when (epoch seconds) and how large (decoded bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    pub at: i64,
    pub bytes: u64,
}

/// What the agent knows about the server's pace (the `pacing` member of `checkin.rec`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pacing {
    /// The decoded size of the next part; `None` until a part was answered.
    pub part_bytes: Option<u64>,
    /// The server's time per KiB of decoded report, in microseconds.
    pub micros_per_kib: Option<u64>,
    /// Compressed bytes per 1,000 decoded bytes of this host's reports.
    pub gzip_permille: Option<u64>,
    /// The last accepted part.
    pub last_part: Option<Sample>,
    /// Runs that failed in a row on the server's side.
    pub failures: u32,
    /// Scheduled runs do not contact the server before this (epoch seconds).
    pub backoff_until: Option<i64>,
    /// The part being sent, recorded before it goes out: when a run is killed while it waits
    /// for the answer, the next run knows the part may have been stored.
    pub in_flight: Option<Sent>,
    /// The last part that got no answer.
    pub unanswered: Option<Sent>,
    /// No part is sent before this (epoch seconds): the server may still be storing
    /// `unanswered`.
    pub hold_until: Option<i64>,
}

/// `old` moves to `sample` at once when the sample is worse (larger), halfway when better: a
/// server that slows down is believed at once, one that speeds up only after a few answers.
fn worse_first(old: Option<u64>, sample: u64) -> u64 {
    match old {
        Some(old) if sample < old => old - (old - sample) / 2,
        _ => sample,
    }
}

fn micros_per_kib(elapsed: Duration, bytes: u64) -> u64 {
    let micros = elapsed.as_micros().saturating_mul(1024) / u128::from(bytes.max(1));
    u64::try_from(micros).unwrap_or(u64::MAX).max(1)
}

/// The decoded size the server handles in `target` at `rate` microseconds per KiB.
fn bytes_for(target: Duration, rate: u64) -> u64 {
    let bytes = target.as_micros().saturating_mul(1024) / u128::from(rate.max(1));
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

impl Pacing {
    /// The largest part the server's limits allow: the policy's decoded limit and the raw limit
    /// divided by how well this host's reports compress, each with headroom.
    pub fn cap(&self, limits: &Limits) -> u64 {
        let decoded = limits.max_decoded / 20 * 19;
        let permille = self
            .gzip_permille
            .unwrap_or(1_000)
            .clamp(1, MAX_GZIP_PERMILLE);
        // Whatever was learned, a part of the minimum size fits the raw limit (it is 64 times
        // as large): only the policy's own limit may make parts smaller than that.
        let raw = ((limits.max_raw / 10 * 9).saturating_mul(1_000) / permille).max(MIN_PART_BYTES);
        decoded.min(raw)
    }

    /// Parts at least this large (or slower than the target) teach the time per KiB: smaller
    /// ones mostly show the server's fixed cost per request. A small policy limit lowers it, or
    /// no part would ever teach anything.
    fn sample_bytes(&self, limits: &Limits) -> u64 {
        MIN_SAMPLE_BYTES.min(self.cap(limits) / 2)
    }

    fn clamp(&self, bytes: u64, limits: &Limits) -> u64 {
        let cap = self.cap(limits);
        bytes.clamp(MIN_PART_BYTES.min(cap), cap)
    }

    /// The decoded size of the next part.
    pub fn budget(&self, limits: &Limits) -> usize {
        let bytes = self.clamp(self.part_bytes.unwrap_or(START_PART_BYTES), limits);
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }

    /// Learns how well this host's reports compress from one part.
    pub fn compressed(&mut self, decoded: usize, gzipped: usize) {
        let (decoded, gzipped) = (decoded as u64, gzipped as u64);
        if decoded >= MIN_SAMPLE_BYTES {
            let sample = (gzipped.saturating_mul(1_000))
                .div_ceil(decoded)
                .clamp(1, MAX_GZIP_PERMILLE);
            self.gzip_permille = Some(worse_first(self.gzip_permille, sample));
        }
    }

    /// Records that a part of `bytes` is about to be sent at `at`.
    pub fn sending(&mut self, at: i64, bytes: usize) {
        self.in_flight = Some(Sent {
            at,
            bytes: bytes as u64,
        });
    }

    /// Learns from an accepted part: `elapsed` runs from sending it to the answer. A success
    /// ends any backoff.
    pub fn accepted(
        &mut self,
        limits: &Limits,
        at: i64,
        bytes: usize,
        records: usize,
        elapsed: Duration,
    ) {
        let current = self.budget(limits) as u64;
        let bytes = bytes as u64;
        let target = limits.target();
        // Only a part that used most of its budget shows that a larger one would be fast too.
        let fast = elapsed <= target / 2 && bytes >= current / 2;
        let sample = micros_per_kib(elapsed, bytes);
        if bytes >= self.sample_bytes(limits) || elapsed > target {
            self.micros_per_kib = Some(worse_first(self.micros_per_kib, sample));
        } else if let Some(rate) = self.micros_per_kib.filter(|rate| fast && sample < *rate) {
            // A small part's time includes the fixed cost per request, so the server is at
            // least this fast: without this, parts shrunk by timeouts would never grow back.
            self.micros_per_kib = Some(sample.max(rate - rate / 3));
        }
        let mut next = current;
        if fast {
            next = current.saturating_add(current / 2);
        }
        if let Some(rate) = self.micros_per_kib {
            next = next.min(bytes_for(target, rate));
        }
        self.part_bytes = Some(self.clamp(next, limits));
        self.last_part = Some(Sample {
            at,
            bytes,
            records: records as u64,
            millis: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        });
        self.in_flight = None;
        self.unanswered = None;
        self.hold_until = None;
        self.failures = 0;
        self.backoff_until = None;
    }

    /// The server refused a part as too large: later parts are at most `bytes`.
    pub fn too_large(&mut self, limits: &Limits, bytes: usize) {
        let current = self.budget(limits) as u64;
        self.part_bytes = Some(self.clamp(current.min(bytes as u64), limits));
    }

    /// A part was sent and no answer came within the timeout: the server takes at least the
    /// timeout for its size, so later parts are halved (and sized to that rate), and nothing is
    /// sent until the server has had time to finish storing it.
    pub fn unanswered(&mut self, limits: &Limits, sent: Sent) {
        let rate = micros_per_kib(limits.timeout, sent.bytes).max(self.micros_per_kib.unwrap_or(0));
        self.micros_per_kib = Some(rate);
        let current = self.budget(limits) as u64;
        let next = (current.min(sent.bytes) / 2).min(bytes_for(limits.target(), rate));
        self.part_bytes = Some(self.clamp(next, limits));
        self.in_flight = None;
        self.unanswered = Some(sent);
        // `sent.at` is cut to whole seconds: one more keeps the hold at least its length.
        self.hold_until = Some(sent.at.saturating_add(limits.hold() + 1));
        if let Some(advice) = self.advice(limits) {
            warn!("{advice}");
        }
    }

    /// A part still in flight when a run starts: the run that sent it was stopped before the
    /// answer came, so the part is treated as unanswered. Returns it, if there was one.
    ///
    /// A hold later than one hold from now was saved by a clock that ran ahead: it is dropped,
    /// or every run (forced ones too) would wait until the clock catches up.
    pub fn recover(&mut self, limits: &Limits) -> Option<Sent> {
        for warning in self.distrust_future(timefmt::now(), Some(limits)) {
            warn!("{warning}");
        }
        let sent = self.in_flight.take()?;
        self.unanswered(limits, sent);
        Some(sent)
    }

    /// The outcome of the part in flight is known (the server answered, or it was never sent).
    pub fn settled(&mut self) {
        self.in_flight = None;
    }

    /// A run failed on the server's side at `now`: scheduled runs stay away for the backoff,
    /// at least until `retry_after` (the server's `Retry-After`) and the hold, never longer
    /// than the cap. `random` in `[0, 1]` spreads a fleet over the upper half of the backoff.
    pub fn failed(
        &mut self,
        now: i64,
        backoff: &Backoff,
        retry_after: Option<Duration>,
        random: f64,
    ) {
        self.in_flight = None;
        self.failures = self.failures.saturating_add(1);
        // Never below one timer period (twice the base): a policy interval shorter than the
        // timer's would otherwise end every backoff before the next scheduled run.
        let cap = backoff
            .cap_seconds
            .max(backoff.base_seconds.saturating_mul(2))
            .clamp(1, MAX_BACKOFF_SECONDS);
        let doubled = backoff
            .base_seconds
            .max(1)
            .saturating_mul(1u64 << (self.failures - 1).min(32));
        let delay = doubled.min(cap);
        let jittered = delay / 2 + ((delay - delay / 2) as f64 * random.clamp(0.0, 1.0)) as u64;
        let mut until = now.saturating_add(jittered as i64);
        if let Some(wait) = retry_after {
            until = until.max(now.saturating_add(wait.as_secs().min(cap) as i64));
        }
        if let Some(hold) = self.hold_until {
            until = until.max(hold);
        }
        self.backoff_until = Some(until);
    }

    /// Drops the times a wrong clock saved: a backoff longer than the longest there is, and
    /// (with `limits`) a hold longer than one hold; a part sent "in the future" was sent now.
    /// Returns a warning for each, for the operator.
    fn distrust_future(&mut self, now: i64, limits: Option<&Limits>) -> Vec<String> {
        let mut warnings = Vec::new();
        let mut drop = |what: &str, until: i64| {
            warnings.push(format!(
                "the saved pace says {what} until {} (now {}): the clock was wrong when it was \
                 saved or has been set back; ignoring it (if this repeats, check the host's \
                 clock; do not delete {FILE}: it also holds the last check-in's sequence number \
                 and the progress of a report sent in parts, whose accepted parts would be sent \
                 again)",
                timefmt::format_utc(until),
                timefmt::format_utc(now)
            ));
        };
        let longest_backoff = now.saturating_add(MAX_BACKOFF_SECONDS as i64);
        if let Some(until) = self.backoff_until.filter(|u| *u > longest_backoff) {
            drop("scheduled runs back off", until);
            self.backoff_until = None;
        }
        if let Some(limits) = limits {
            let longest_hold = now.saturating_add(limits.hold() + 1);
            if let Some(until) = self.hold_until.filter(|u| *u > longest_hold) {
                drop("nothing is sent", until);
                self.hold_until = Some(longest_hold);
            }
        }
        for sent in [&mut self.in_flight, &mut self.unanswered]
            .into_iter()
            .flatten()
        {
            sent.at = sent.at.min(now);
        }
        if let Some(last) = &mut self.last_part {
            last.at = last.at.min(now);
        }
        warnings
    }

    /// What to tell the operator when even parts of the smallest size get no answer: making
    /// them smaller is no longer possible, so the timeout or the server has to change.
    pub fn advice(&self, limits: &Limits) -> Option<String> {
        let sent = self.unanswered?;
        let smallest = MIN_PART_BYTES.min(self.cap(limits));
        // A part cut to the smallest budget renders a little over it (header, last record).
        (sent.bytes <= smallest + smallest / 4).then(|| {
                format!(
                    "a check-in part of {} bytes, the smallest the agent sends, got no answer within {} s: \
                     the server is overloaded or stuck; raise --request-timeout-seconds \
                     (GRAPHEON_AGENT_REQUEST_TIMEOUT_SECONDS) or look at the server's load and logs",
                    sent.bytes,
                    limits.timeout.as_secs()
                )
            })
    }

    /// When scheduled runs may contact the server again, if that is after `now`.
    pub fn backoff(&self, now: i64) -> Option<i64> {
        self.backoff_until.filter(|until| *until > now)
    }

    /// Until when no part may be sent, if that is after `now`.
    pub fn hold(&self, now: i64) -> Option<i64> {
        self.hold_until.filter(|until| *until > now)
    }

    /// What `--status` shows: (label, text) lines.
    pub fn describe(&self, limits: &Limits, now: i64) -> Vec<(&'static str, String)> {
        let when = timefmt::format_utc;
        let size = match self.part_bytes {
            Some(_) => format!(
                "{} bytes decoded (learned; the server's limits allow {})",
                self.budget(limits),
                self.cap(limits)
            ),
            None => format!(
                "{} bytes decoded (nothing learned yet; the server's limits allow {})",
                self.budget(limits),
                self.cap(limits)
            ),
        };
        let time = match (self.last_part, self.micros_per_kib) {
            (Some(s), rate) => format!(
                "{}.{:03} s for the last part ({} bytes, {} records, at {}){}; target {} s",
                s.millis / 1000,
                s.millis % 1000,
                s.bytes,
                s.records,
                when(s.at),
                rate.map_or_else(String::new, |r| format!(
                    ", {}.{:03} ms per KiB",
                    r / 1000,
                    r % 1000
                )),
                limits.target().as_secs_f64()
            ),
            (None, Some(r)) => format!(
                "no part answered yet; at least {}.{:03} ms per KiB (a part got no answer); target {} s",
                r / 1000,
                r % 1000,
                limits.target().as_secs_f64()
            ),
            (None, None) => "not measured yet".to_string(),
        };
        let backoff = match self.backoff(now) {
            Some(until) => format!(
                "scheduled runs wait until {} after {} failed run(s) (--force does not wait)",
                when(until),
                self.failures
            ),
            None if self.failures > 0 => format!("none ({} failed run(s) in a row)", self.failures),
            None => "none".to_string(),
        };
        let mut lines = vec![
            ("part size", size),
            ("server time per part", time),
            ("backoff", backoff),
        ];
        if let Some(advice) = self.advice(limits) {
            lines.push(("advice", advice));
        }
        if let Some(sent) = self.unanswered {
            let hold = match self.hold(now) {
                Some(until) => format!("; nothing is sent before {}", when(until)),
                None => String::new(),
            };
            lines.push((
                "unanswered part",
                format!(
                    "{} bytes sent at {} got no answer; resent in smaller parts{hold}",
                    sent.bytes,
                    when(sent.at)
                ),
            ));
        }
        lines
    }

    fn to_json(&self) -> String {
        fn sent(s: Option<Sent>) -> String {
            s.map_or_else(
                || "null".to_string(),
                |s| {
                    let mut out = String::new();
                    let mut o = Object::new(&mut out);
                    o.str("at", &timefmt::format_utc(s.at))
                        .num("bytes", s.bytes);
                    o.end();
                    out
                },
            )
        }
        let last = self.last_part.map_or_else(
            || "null".to_string(),
            |s| {
                let mut out = String::new();
                let mut o = Object::new(&mut out);
                o.str("at", &timefmt::format_utc(s.at))
                    .num("bytes", s.bytes)
                    .num("records", s.records)
                    .num("millis", s.millis);
                o.end();
                out
            },
        );
        let at = |t: Option<i64>| t.map(timefmt::format_utc);
        let mut out = String::new();
        let mut o = Object::new(&mut out);
        o.opt_num("part_bytes", self.part_bytes)
            .opt_num("micros_per_kib", self.micros_per_kib)
            .opt_num("gzip_permille", self.gzip_permille)
            .raw("last_part", &last)
            .num("failures", self.failures)
            .opt_str("backoff_until", at(self.backoff_until).as_deref())
            .raw("in_flight", &sent(self.in_flight))
            .raw("unanswered", &sent(self.unanswered))
            .opt_str("hold_until", at(self.hold_until).as_deref());
        o.end();
        out
    }

    /// Parses the saved pace; `None` when it is not a JSON object. A field of the wrong type
    /// is left out (its default), so one bad value does not throw away the rest.
    fn from_json(text: &str) -> Option<Pacing> {
        input::check_json(text, input::REPLY_JSON).ok()?;
        let v: Value = miniserde::json::from_str(text).ok()?;
        if !matches!(v, Value::Object(_)) {
            return None;
        }
        let positive = |key: &str| {
            json::get_i64(&v, key)
                .and_then(|n| u64::try_from(n).ok())
                .filter(|n| *n > 0)
        };
        let time = |value: &Value, key: &str| json::get_str(value, key).and_then(timefmt::parse);
        let count = |value: &Value, key: &str| {
            json::get_i64(value, key).and_then(|n| u64::try_from(n).ok())
        };
        let sent = |key: &str| {
            let s = json::get(&v, key)?;
            Some(Sent {
                at: time(s, "at")?,
                bytes: count(s, "bytes")?,
            })
        };
        let last_part = json::get(&v, "last_part").and_then(|s| {
            Some(Sample {
                at: time(s, "at")?,
                bytes: count(s, "bytes")?,
                records: count(s, "records")?,
                millis: count(s, "millis")?,
            })
        });
        Some(Pacing {
            part_bytes: positive("part_bytes"),
            micros_per_kib: positive("micros_per_kib"),
            gzip_permille: positive("gzip_permille").filter(|p| *p <= MAX_GZIP_PERMILLE),
            last_part,
            failures: json::get_i64(&v, "failures")
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
            backoff_until: time(&v, "backoff_until"),
            in_flight: sent("in_flight"),
            unanswered: sent("unanswered"),
            hold_until: time(&v, "hold_until"),
        })
    }
}

/// Reads the saved pace (or 0.2.0's `pacing.json`, the first time). Missing, unreadable or
/// damaged, it is the defaults (with a warning when it was there): the agent then starts again
/// with small parts and no backoff.
pub fn load(dir: &StateDir) -> Pacing {
    let damaged = |path: &std::path::Path| {
        warn!(
            "the pace saved in {} is damaged; starting again from small check-in parts and no backoff",
            path.display()
        );
        Pacing::default()
    };
    match dir.pacing_record() {
        Ok(None) => Pacing::default(),
        Ok(Some(text)) => match Pacing::from_json(&text) {
            Some(mut pacing) => {
                // The hold is checked against the request timeout when a run starts (recover).
                for warning in pacing.distrust_future(timefmt::now(), None) {
                    warn!("{warning}");
                }
                pacing
            }
            None => damaged(&dir.pacing_path()),
        },
        Err(path) => damaged(&path),
    }
}

/// Saves the pace in `checkin.rec`, as `when` says: [`Durability::Cached`] for the mark made
/// before a part is sent (the answer's write, synced, makes it durable in the same page),
/// [`Durability::Deferred`] to go with the state's next save.
pub fn save(dir: &StateDir, pacing: &Pacing, when: Durability) -> Result<()> {
    dir.save_pacing(pacing.to_json(), when)
}

/// A random number in `[0, 1]` from the OS (0.5 when there is none).
pub fn random() -> f64 {
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_ok() {
        f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX)
    } else {
        0.5
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_744_647;

    fn limits(timeout_secs: u64, max_decoded: u64) -> Limits {
        Limits {
            max_decoded,
            max_raw: 262_144,
            timeout: Duration::from_secs(timeout_secs),
        }
    }

    fn backoff() -> Backoff {
        Backoff {
            base_seconds: 450,
            cap_seconds: 3_600,
        }
    }

    #[test]
    fn the_first_part_is_small_and_within_the_limits() {
        let p = Pacing::default();
        assert_eq!(p.budget(&limits(30, 262_144)), 65_536);
        // The smallest policy limit, with headroom.
        assert_eq!(p.budget(&limits(30, 16_384)), 15_561);
        // Nothing known about compression: the raw limit counts as decoded bytes.
        assert_eq!(p.cap(&limits(30, 10_485_760)), 235_926);
    }

    #[test]
    fn fast_answers_grow_parts_by_half_up_to_what_the_limits_allow() {
        let l = limits(30, 10_485_760);
        let mut p = Pacing::default();
        p.compressed(65_536, 3_277); // 5 %: JSON of sockets compresses well
        assert_eq!(p.gzip_permille, Some(51));
        let mut sizes = Vec::new();
        for _ in 0..8 {
            let budget = p.budget(&l);
            sizes.push(budget);
            p.accepted(&l, NOW, budget, budget / 170, Duration::from_millis(200));
        }
        assert_eq!(
            sizes,
            [65_536, 98_304, 147_456, 221_184, 331_776, 497_664, 746_496, 1_119_744]
        );
        // The compressed limit: 235,926 raw bytes at 51 per 1,000.
        assert_eq!(p.cap(&l), 4_626_000);
        for _ in 0..10 {
            let budget = p.budget(&l);
            p.accepted(&l, NOW, budget, budget / 170, Duration::from_millis(200));
        }
        assert_eq!(p.budget(&l), 4_626_000);
        // A small policy limit wins over everything learned.
        assert_eq!(p.budget(&limits(30, 262_144)), 249_033);
    }

    #[test]
    fn slow_answers_size_parts_to_a_third_of_the_timeout() {
        let l = limits(30, 10_485_760);
        let mut p = Pacing::default();
        // 64 KiB took 20 s: 312.5 ms per KiB, so 10 s is 32 KiB.
        p.accepted(&l, NOW, 65_536, 385, Duration::from_secs(20));
        assert_eq!(p.micros_per_kib, Some(312_500));
        assert_eq!(p.budget(&l), 32_768);
        // A part that is fast but small does not make the next one larger.
        p.accepted(&l, NOW, 2_000, 12, Duration::from_millis(50));
        assert_eq!(p.budget(&l), 32_768);
        // The server speeds up: believed halfway per answer, never past +50 % per part.
        p.accepted(&l, NOW, 32_768, 190, Duration::from_secs(2));
        assert_eq!(p.micros_per_kib, Some(187_500));
        assert_eq!(p.budget(&l), 49_152);
    }

    #[test]
    fn an_unanswered_part_halves_the_size_and_holds_every_run() {
        let l = limits(30, 262_144);
        let mut p = Pacing::default();
        p.sending(NOW, 65_536);
        let sent = p.in_flight.unwrap();
        p.unanswered(&l, sent);
        // It took the server more than 30 s: a third of that rate is a third of the part,
        // which is below half of it.
        assert_eq!(p.micros_per_kib, Some(468_750));
        assert_eq!(p.budget(&l), 21_845);
        assert_eq!(p.unanswered, Some(sent));
        assert_eq!(p.in_flight, None);
        assert_eq!(p.hold(NOW + 120), Some(NOW + 121));
        assert_eq!(p.hold(NOW + 121), None);
        p.failed(NOW + 30, &backoff(), None, 0.0);
        assert_eq!(p.backoff(NOW + 30), Some(NOW + 255));
        let short = Backoff {
            base_seconds: 10,
            cap_seconds: 3_600,
        };
        p.failures = 0;
        p.failed(NOW + 30, &short, None, 0.0);
        assert_eq!(
            p.backoff(NOW + 30),
            Some(NOW + 121),
            "never before the hold ends"
        );
        // The next accepted part ends the hold, the backoff and the failure count.
        p.accepted(&l, NOW + 200, 21_845, 128, Duration::from_secs(5));
        assert_eq!(
            (p.unanswered, p.hold_until, p.backoff_until, p.failures),
            (None, None, None, 0)
        );
    }

    #[test]
    fn a_part_in_flight_when_the_run_was_killed_counts_as_unanswered() {
        let l = limits(2, 262_144);
        let mut p = Pacing::default();
        assert_eq!(p.recover(&l), None);
        p.sending(NOW, 40_000);
        let recovered = p.recover(&l);
        assert_eq!(
            recovered,
            Some(Sent {
                at: NOW,
                bytes: 40_000
            })
        );
        assert_eq!(p.in_flight, None);
        assert_eq!(p.unanswered, recovered);
        // Four 2 s timeouts would be 8 s; a loaded server takes a minute over a part.
        assert_eq!(p.hold_until, Some(NOW + 121));
        assert_eq!(p.budget(&l), 13_333);
    }

    #[test]
    fn times_a_clock_ahead_saved_are_dropped_so_runs_are_not_blocked() {
        let l = limits(30, 262_144);
        let mut p = Pacing::from_json(
            r#"{"hold_until":"2099-01-01T00:00:00Z","backoff_until":"2099-01-01T00:00:00Z",
                "in_flight":{"at":"2099-01-01T00:00:00Z","bytes":8192},
                "unanswered":{"at":"2099-01-01T00:00:00Z","bytes":8192}}"#,
        )
        .unwrap();
        let warnings = p.distrust_future(NOW, Some(&l));
        assert_eq!(
            warnings,
            [
                "the saved pace says scheduled runs back off until 2099-01-01T00:00:00Z (now \
                 2026-11-27T01:57:27Z): the clock was wrong when it was saved or has been set \
                 back; ignoring it (if this repeats, check the host's clock; do not delete \
                 checkin.rec: it also holds the last check-in's sequence number and the \
                 progress of a report sent in parts, whose accepted parts would be sent again)",
                "the saved pace says nothing is sent until 2099-01-01T00:00:00Z (now \
                 2026-11-27T01:57:27Z): the clock was wrong when it was saved or has been set \
                 back; ignoring it (if this repeats, check the host's clock; do not delete \
                 checkin.rec: it also holds the last check-in's sequence number and the \
                 progress of a report sent in parts, whose accepted parts would be sent again)",
            ]
        );
        assert_eq!(p.backoff(NOW), None);
        assert_eq!(p.hold(NOW), Some(NOW + 121), "at most one hold from now");
        let now_sent = Some(Sent {
            at: NOW,
            bytes: 8192,
        });
        assert_eq!((p.in_flight, p.unanswered), (now_sent, now_sent));
        // Times within reach are believed as saved.
        let mut near = Pacing {
            backoff_until: Some(NOW + 86_400),
            hold_until: Some(NOW + 121),
            ..Pacing::default()
        };
        let before = near.clone();
        assert_eq!(near.distrust_future(NOW, Some(&l)), Vec::<String>::new());
        assert_eq!(near, before);
    }

    #[test]
    fn parts_shrunk_by_unanswered_parts_grow_back_after_fast_answers() {
        let l = limits(30, 262_144);
        let mut p = Pacing::default();
        for at in [NOW, NOW + 200] {
            let budget = p.budget(&l);
            p.sending(at, budget);
            let sent = p.in_flight.unwrap();
            p.unanswered(&l, sent);
        }
        assert_eq!(p.budget(&l), 7_281);
        let mut sizes = Vec::new();
        for _ in 0..8 {
            let budget = p.budget(&l);
            sizes.push(budget);
            p.accepted(
                &l,
                NOW + 400,
                budget,
                budget / 170,
                Duration::from_millis(50),
            );
        }
        assert_eq!(
            sizes,
            [7_281, 10_921, 16_381, 24_571, 36_856, 55_284, 82_926, 124_389]
        );
    }

    #[test]
    fn parts_under_a_small_policy_limit_grow_back_after_a_slow_answer() {
        let l = limits(30, 16_384);
        let mut p = Pacing::default();
        assert_eq!(p.budget(&l), 15_561);
        p.accepted(&l, NOW, 15_561, 90, Duration::from_secs(12));
        assert_eq!(p.budget(&l), 12_967);
        let mut sizes = Vec::new();
        for _ in 0..3 {
            let budget = p.budget(&l);
            p.accepted(&l, NOW, budget, budget / 170, Duration::from_millis(50));
            sizes.push(p.budget(&l));
        }
        assert_eq!(sizes, [15_561, 15_561, 15_561]);
    }

    #[test]
    fn a_wrong_gzip_ratio_never_makes_parts_smaller_than_the_minimum() {
        let l = limits(30, 262_144);
        for permille in ["1000000000", "0", "1101"] {
            let p = Pacing::from_json(&format!(r#"{{"gzip_permille":{permille}}}"#)).unwrap();
            assert_eq!(p, Pacing::default(), "{permille}");
        }
        let p = Pacing::from_json(r#"{"gzip_permille":1100}"#).unwrap();
        assert_eq!(p.gzip_permille, Some(1_100));
        // Set directly (not from the file): the cap still keeps the minimum part.
        let huge = Pacing {
            gzip_permille: Some(1_000_000_000),
            ..Pacing::default()
        };
        assert_eq!((huge.cap(&l), huge.budget(&l)), (214_478, 65_536));
        let tiny_raw = Limits {
            max_raw: 1_000,
            ..l
        };
        assert_eq!(huge.budget(&tiny_raw), 4_096);
        // Incompressible data cannot teach a ratio above the ceiling either.
        let mut p = Pacing::default();
        p.compressed(20_000, 2_000_000);
        assert_eq!(p.gzip_permille, Some(1_100));
    }

    #[test]
    fn smallest_parts_without_an_answer_tell_the_operator_what_to_change() {
        let l = limits(30, 262_144);
        let mut p = Pacing::default();
        p.sending(NOW, 65_536);
        p.unanswered(&l, p.in_flight.unwrap());
        assert_eq!(p.advice(&l), None, "a smaller part may still get through");
        for at in 1..4 {
            let budget = p.budget(&l);
            p.sending(NOW + at * 200, budget);
            p.unanswered(&l, p.in_flight.unwrap());
        }
        assert_eq!(p.budget(&l), 4_096);
        let advice = "a check-in part of 4096 bytes, the smallest the agent sends, got no answer \
                      within 30 s: the server is overloaded or stuck; raise \
                      --request-timeout-seconds (GRAPHEON_AGENT_REQUEST_TIMEOUT_SECONDS) or look \
                      at the server's load and logs";
        assert_eq!(p.advice(&l).as_deref(), Some(advice));
        assert_eq!(
            p.describe(&l, NOW + 600).get(3),
            Some(&("advice", advice.to_string()))
        );
    }

    #[test]
    fn backoff_lasts_at_least_one_timer_period_under_a_short_policy_interval() {
        let mut p = Pacing::default();
        let short = Backoff {
            base_seconds: 450,
            cap_seconds: 60,
        };
        p.failed(NOW, &short, None, 1.0);
        p.failed(NOW, &short, None, 1.0);
        assert_eq!(p.backoff_until, Some(NOW + 900));
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_honours_retry_after() {
        let mut p = Pacing::default();
        let mut ranges = Vec::new();
        for _ in 0..6 {
            p.failed(NOW, &backoff(), None, 0.0);
            let low = p.backoff_until.unwrap() - NOW;
            p.failures -= 1;
            p.failed(NOW, &backoff(), None, 1.0);
            let high = p.backoff_until.unwrap() - NOW;
            ranges.push((p.failures, low, high));
        }
        assert_eq!(
            ranges,
            [
                (1, 225, 450),
                (2, 450, 900),
                (3, 900, 1_800),
                (4, 1_800, 3_600),
                (5, 1_800, 3_600),
                (6, 1_800, 3_600)
            ]
        );
        assert_eq!(p.backoff(NOW + 3_599), Some(NOW + 3_600));
        assert_eq!(p.backoff(NOW + 3_600), None);

        let mut p = Pacing::default();
        p.failed(NOW, &backoff(), Some(Duration::from_secs(2_000)), 0.0);
        assert_eq!(p.backoff_until, Some(NOW + 2_000));
        p.failed(NOW, &backoff(), Some(Duration::from_secs(1 << 40)), 0.0);
        assert_eq!(p.backoff_until, Some(NOW + 3_600), "capped at the interval");
    }

    #[test]
    fn pacing_round_trips_and_damage_gives_defaults() {
        let p = Pacing {
            part_bytes: Some(98_304),
            micros_per_kib: Some(1_234),
            gzip_permille: Some(51),
            last_part: Some(Sample {
                at: NOW,
                bytes: 65_536,
                records: 385,
                millis: 1_250,
            }),
            failures: 2,
            backoff_until: Some(NOW + 900),
            in_flight: Some(Sent {
                at: NOW + 1,
                bytes: 98_304,
            }),
            unanswered: Some(Sent {
                at: NOW - 60,
                bytes: 30_000,
            }),
            hold_until: Some(NOW + 60),
        };
        assert_eq!(Pacing::from_json(&p.to_json()), Some(p));
        assert_eq!(
            Pacing::default().to_json(),
            concat!(
                r#"{"part_bytes":null,"micros_per_kib":null,"gzip_permille":null,"last_part":null,"#,
                r#""failures":0,"backoff_until":null,"in_flight":null,"unanswered":null,"hold_until":null}"#
            )
        );
        let deep = format!(
            "{{\"part_bytes\":{}{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        for junk in ["", "[1]", "{\"part_bytes\":", "null", deep.as_str()] {
            assert_eq!(Pacing::from_json(junk), None, "{junk}");
        }
        let odd = Pacing::from_json(
            r#"{"part_bytes":-5,"micros_per_kib":"fast","failures":1e99,"backoff_until":"soon","gzip_permille":40}"#,
        );
        assert_eq!(
            odd,
            Some(Pacing {
                gzip_permille: Some(40),
                ..Pacing::default()
            })
        );
    }

    #[test]
    fn status_says_what_was_learned() {
        let l = limits(30, 262_144);
        let mut p = Pacing::default();
        assert_eq!(
            p.describe(&l, NOW),
            [
                (
                    "part size",
                    "65536 bytes decoded (nothing learned yet; the server's limits allow 235926)"
                        .to_string()
                ),
                ("server time per part", "not measured yet".to_string()),
                ("backoff", "none".to_string()),
            ]
        );
        p.accepted(&l, NOW, 65_536, 385, Duration::from_millis(1_250));
        p.sending(NOW + 10, 98_304);
        let sent = p.in_flight.unwrap();
        p.unanswered(&l, sent);
        p.failed(NOW + 40, &backoff(), None, 0.0);
        assert_eq!(
            p.describe(&l, NOW + 40),
            [
                (
                    "part size",
                    "32768 bytes decoded (learned; the server's limits allow 235926)".to_string()
                ),
                (
                    "server time per part",
                    "1.250 s for the last part (65536 bytes, 385 records, at 2026-11-27T01:57:27Z), \
                     312.500 ms per KiB; target 10 s"
                        .to_string()
                ),
                (
                    "backoff",
                    "scheduled runs wait until 2026-11-27T02:01:52Z after 1 failed run(s) \
                     (--force does not wait)"
                        .to_string()
                ),
                (
                    "unanswered part",
                    "98304 bytes sent at 2026-11-27T01:57:37Z got no answer; resent in smaller \
                     parts; nothing is sent before 2026-11-27T01:59:38Z"
                        .to_string()
                ),
            ]
        );
    }
}
