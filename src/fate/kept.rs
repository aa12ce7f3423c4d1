//! What is kept of a settled event: its body, which rules planned it, and
//! how each planned item settled (a few bytes each). Its `EventRecord` is
//! made from these only when it is read: the body parsed and planned again
//! with the rules that planned it (a plan is a pure function of the event
//! and the rules), found by fingerprint in the `RulesBook`. Plans that are
//! not (a replayed dead letter's single action, a plan that read upstream)
//! are kept as they are.
//!
//! Making the whole record at every settle (the body parsed and planned a
//! second time, every account a string, the document serialised) cost
//! about a third of an event's whole way from intake to settle; records are
//! read rarely. The payload format is below (`encode`).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use parking_lot::RwLock;
use serde::Deserialize;

use super::record::{EventRecord, ItemOutcome, RecordBuilder, Settled, Status};
use crate::domain::{Action, DeadLetterReason, Source};
use crate::event::Event;
use crate::rules::Rules;

/// A settled event as it is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettledEvent {
    /// The `webhook-id` or AMQP `message_id`.
    pub id: String,
    pub source: Source,
    pub kind: Arc<str>,
    pub accepted_at_ms: u64,
    pub settled_at_ms: u64,
    /// Some item was given up.
    pub dead_lettered: bool,
    /// `Rules::fingerprint` of the rules that planned it.
    pub rules: u64,
    /// The event as it was accepted.
    pub body: Vec<u8>,
    /// The plan, when it cannot be made again from the body.
    pub plan: Option<Vec<Action>>,
    /// Each settled item: its index in the plan, and how it settled.
    pub outcomes: Vec<(u32, ItemOutcome)>,
}

/// The first bytes of a kept payload: 0xFF can start neither JSON nor a
/// deflate stream (block type 3 is reserved), the older payloads.
const MAGIC: [u8; 3] = [0xFF, b'K', 1];
/// `info` absent.
const NO_INFO: u32 = u32::MAX;

impl SettledEvent {
    pub fn status(&self) -> Status {
        if self.dead_lettered {
            Status::DeadLettered
        } else {
            Status::Settled
        }
    }

    /// The user the event is about, read from its body alone.
    pub fn user_id(&self) -> Option<String> {
        user_of(&self.body)
    }

    /// Its record; `None` if its body no longer makes an event or the
    /// rules that planned it are unknown here.
    pub fn record(&self, book: &RulesBook) -> Option<EventRecord> {
        let event = Event::parse(&self.body).ok()?;
        let plan = match &self.plan {
            Some(p) => p.clone(),
            None => {
                let Some(rules) = book.get(self.rules) else {
                    tracing::error!(id = %self.id, rules = format_args!("{:016x}", self.rules), "an event record's rules are unknown here (their snapshot file is gone); not answered");
                    return None;
                };
                rules.plan(&event).ok()?
            }
        };
        let mut b = RecordBuilder::new(
            &self.id,
            self.source,
            &self.kind,
            event.data.user_id,
            self.accepted_at_ms,
            plan,
        );
        for (i, o) in &self.outcomes {
            b.outcome(*i as usize, o.clone());
        }
        Some(b.build(self.status(), Some(self.settled_at_ms), None))
    }

    /// Appends its payload to `out`:
    ///
    /// `MAGIC | source str8 | dead u8 | accepted u64 | settled u64 | rules
    /// u64 | id str16 | kind str16 | body bytes32 | plan bytes32 (JSON, empty:
    /// none) | n u32 | n × (index u32 | result u8 | reason str8 | code i64 |
    /// at u64 | attempts u32 | info u32 length (u32::MAX: none) + bytes)`,
    /// little-endian; `strN`/`bytesN`: an N-bit length, then the bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        put_str8(out, self.source.as_str());
        out.push(u8::from(self.dead_lettered));
        out.extend_from_slice(&self.accepted_at_ms.to_le_bytes());
        out.extend_from_slice(&self.settled_at_ms.to_le_bytes());
        out.extend_from_slice(&self.rules.to_le_bytes());
        put_str16(out, &self.id);
        put_str16(out, &self.kind);
        put_bytes32(out, &self.body);
        match &self.plan {
            Some(p) => put_bytes32(out, &serde_json::to_vec(p).expect("actions serialize")),
            None => put_bytes32(out, b""),
        }
        out.extend_from_slice(&(self.outcomes.len() as u32).to_le_bytes());
        for (i, o) in &self.outcomes {
            out.extend_from_slice(&i.to_le_bytes());
            let (result, reason) = match o.result {
                Settled::Applied => (1u8, ""),
                Settled::Noop => (2, ""),
                Settled::DeadLettered(r) => (3, r.as_str()),
            };
            out.push(result);
            put_str8(out, reason);
            out.extend_from_slice(&o.error_code.to_le_bytes());
            out.extend_from_slice(&o.at_unix_ms.to_le_bytes());
            out.extend_from_slice(&o.attempts.to_le_bytes());
            match &o.error_info {
                Some(info) => put_bytes32(out, info.as_bytes()),
                None => out.extend_from_slice(&NO_INFO.to_le_bytes()),
            }
        }
    }

    /// Whether `payload` is one `encode` wrote.
    pub fn is_kept(payload: &[u8]) -> bool {
        payload.starts_with(&MAGIC)
    }

    /// `encode`'s bytes back; `None` if they are not that.
    pub fn decode(payload: &[u8]) -> Option<SettledEvent> {
        let mut r = Reader(payload.strip_prefix(&MAGIC)?);
        let source = Source::parse(r.str8()?)?;
        let dead_lettered = r.u8()? != 0;
        let accepted_at_ms = r.u64()?;
        let settled_at_ms = r.u64()?;
        let rules = r.u64()?;
        let id = r.str16()?.to_owned();
        let kind: Arc<str> = r.str16()?.into();
        let body = r.bytes32()?.to_vec();
        let plan = match r.bytes32()? {
            [] => None,
            json => Some(serde_json::from_slice(json).ok()?),
        };
        let n = r.u32()? as usize;
        let mut outcomes = Vec::with_capacity(n.min(payload.len() / 20));
        for _ in 0..n {
            let i = r.u32()?;
            let result = r.u8()?;
            let reason = r.str8()?;
            let result = match result {
                1 => Settled::Applied,
                2 => Settled::Noop,
                3 => Settled::DeadLettered(
                    DeadLetterReason::parse(reason).unwrap_or(DeadLetterReason::UnknownError),
                ),
                _ => return None,
            };
            let error_code = r.i64()?;
            let at_unix_ms = r.u64()?;
            let attempts = r.u32()?;
            let error_info = match r.u32()? {
                NO_INFO => None,
                len => Some(String::from_utf8_lossy(r.take(len as usize)?).into_owned()),
            };
            outcomes.push((
                i,
                ItemOutcome {
                    result,
                    error_code,
                    error_info,
                    at_unix_ms,
                    attempts,
                },
            ));
        }
        Some(SettledEvent {
            id,
            source,
            kind,
            accepted_at_ms,
            settled_at_ms,
            dead_lettered,
            rules,
            body,
            plan,
            outcomes,
        })
    }
}

/// `data.user_id` of an event body, without reading the rest into memory.
pub fn user_of(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Doc {
        data: Data,
    }
    #[derive(Deserialize)]
    struct Data {
        user_id: String,
    }
    serde_json::from_slice::<Doc>(body)
        .ok()
        .map(|d| d.data.user_id)
}

fn put_str8(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(255)];
    out.push(b.len() as u8);
    out.extend_from_slice(b);
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// Reads a payload front to back; `None` past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn str8(&mut self) -> Option<&'a str> {
        let n = usize::from(self.u8()?);
        std::str::from_utf8(self.take(n)?).ok()
    }

    fn str16(&mut self) -> Option<&'a str> {
        let n = usize::from(u16::from_le_bytes(self.take(2)?.try_into().ok()?));
        std::str::from_utf8(self.take(n)?).ok()
    }

    fn bytes32(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// The rules records were planned with, by fingerprint: the service's own,
/// and earlier ones from their snapshot files (`rules-<fingerprint>.json`
/// beside the records), or, in broker mode, from the record stream.
pub struct RulesBook {
    current: Arc<Rules>,
    /// Where snapshots are kept, once `keep_in` said.
    dir: OnceLock<PathBuf>,
    known: RwLock<HashMap<u64, Option<Arc<Rules>>>>,
}

impl RulesBook {
    pub fn new(current: Arc<Rules>) -> Arc<RulesBook> {
        Arc::new(RulesBook {
            current,
            dir: OnceLock::new(),
            known: RwLock::new(HashMap::new()),
        })
    }

    /// The service's rules.
    pub fn current(&self) -> &Arc<Rules> {
        &self.current
    }

    fn path(dir: &Path, fp: u64) -> PathBuf {
        dir.join(format!("rules-{fp:016x}.json"))
    }

    /// Keeps snapshots in `dir` from now on (the first directory given
    /// stays), and the current rules' there now (durably: written before
    /// any record planned with them).
    pub fn keep_in(&self, dir: &Path) -> io::Result<()> {
        write_snapshot(dir, self.current.fingerprint(), &self.current.snapshot())?;
        let _ = self.dir.set(dir.to_owned());
        Ok(())
    }

    /// Rules that came with records from elsewhere (another replica's):
    /// known from now on, and kept in the snapshot directory.
    pub fn remember(&self, snapshot: &[u8]) -> Option<u64> {
        let rules = Rules::from_snapshot(snapshot).ok()?;
        let fp = rules.fingerprint();
        // A miss is remembered too (`get`): only a hit means known.
        if fp == self.current.fingerprint() || matches!(self.known.read().get(&fp), Some(Some(_))) {
            return Some(fp);
        }
        if let Some(dir) = self.dir.get() {
            if let Err(e) = write_snapshot(dir, fp, snapshot) {
                tracing::warn!(error = %e, "cannot keep a rules snapshot beside the event records");
            }
        }
        self.known.write().insert(fp, Some(Arc::new(rules)));
        Some(fp)
    }

    /// The rules with fingerprint `fp`, if known here.
    pub fn get(&self, fp: u64) -> Option<Arc<Rules>> {
        if fp == self.current.fingerprint() {
            return Some(self.current.clone());
        }
        if let Some(r) = self.known.read().get(&fp) {
            return r.clone();
        }
        let loaded = self
            .dir
            .get()
            .and_then(|d| std::fs::read(Self::path(d, fp)).ok())
            .and_then(|b| Rules::from_snapshot(&b).ok())
            .filter(|r| r.fingerprint() == fp)
            .map(Arc::new);
        self.known.write().insert(fp, loaded.clone());
        loaded
    }
}

/// Writes a snapshot file unless it is there: a temporary file, synced,
/// renamed.
fn write_snapshot(dir: &Path, fp: u64, bytes: &[u8]) -> io::Result<()> {
    let path = RulesBook::path(dir, fp);
    if path.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    {
        let f = std::fs::File::create(&tmp)?;
        io::Write::write_all(&mut &f, bytes)?;
        f.sync_data()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{default_rules, RuleChannels};

    fn ban(id: &str) -> SettledEvent {
        SettledEvent {
            id: id.into(),
            source: Source::Webhook,
            kind: "user.banned".into(),
            accepted_at_ms: 1_000,
            settled_at_ms: 2_000,
            dead_lettered: true,
            rules: rules().fingerprint(),
            body: br#"{"type":"user.banned","data":{"user_id":"u1","channels":["@TOA#_a","@TOA#_b"]}}"#.to_vec(),
            plan: None,
            outcomes: vec![
                (
                    0,
                    ItemOutcome {
                        result: Settled::Applied,
                        error_code: 0,
                        error_info: None,
                        at_unix_ms: 1_500,
                        attempts: 1,
                    },
                ),
                (
                    1,
                    ItemOutcome {
                        result: Settled::DeadLettered(DeadLetterReason::ItemFailed),
                        error_code: 6017,
                        error_info: Some("no such account".into()),
                        at_unix_ms: 1_600,
                        attempts: 2,
                    },
                ),
            ],
        }
    }

    fn rules() -> Arc<Rules> {
        Arc::new(Rules::new(default_rules(), &RuleChannels::default()))
    }

    #[test]
    fn a_payload_decodes_to_what_was_encoded() {
        let mut e = ban("e1");
        let mut out = Vec::new();
        e.encode(&mut out);
        assert!(SettledEvent::is_kept(&out));
        assert_eq!(SettledEvent::decode(&out), Some(e.clone()));
        // A kept plan too.
        e.plan = Some(rules().plan(&Event::parse(&e.body).unwrap()).unwrap());
        out.clear();
        e.encode(&mut out);
        assert_eq!(SettledEvent::decode(&out), Some(e));
        // Cut short anywhere, it is not a payload.
        for n in 0..out.len() {
            assert_eq!(SettledEvent::decode(&out[..n]), None, "cut at {n}");
        }
        assert!(!SettledEvent::is_kept(b"{\"id\":1}"));
    }

    #[test]
    fn the_record_is_planned_again_with_the_rules_that_planned_it() {
        let book = RulesBook::new(rules());
        let r = ban("e1").record(&book).unwrap();
        assert_eq!(r.id, "e1");
        assert_eq!(r.user_id, "u1");
        assert_eq!(r.status, Status::DeadLettered);
        assert_eq!(r.settled_at_ms, Some(2_000));
        assert_eq!(r.actions.len(), 2);
        assert_eq!(r.actions[0].target, "@TOA#_a");
        assert_eq!(r.actions[0].counts.applied, 1);
        assert_eq!(r.actions[1].dead_lettered[0].error_code, 6017);
        assert_eq!(ban("e1").user_id().as_deref(), Some("u1"));

        // Rules unknown here: no record rather than a wrong one.
        let mut other = ban("e2");
        other.rules ^= 1;
        assert_eq!(other.record(&book), None);
    }

    #[test]
    fn earlier_rules_are_found_by_their_snapshot_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut old_rules = default_rules();
        old_rules.get_mut("user.banned").unwrap().unfollow = false;
        let old = Arc::new(Rules::new(old_rules, &RuleChannels::default()));
        assert_ne!(old.fingerprint(), rules().fingerprint());
        RulesBook::new(old.clone()).keep_in(dir.path()).unwrap();

        // A later run, with other rules, reads a record the old ones planned.
        let book = RulesBook::new(rules());
        book.keep_in(dir.path()).unwrap();
        let mut e = ban("e1");
        e.rules = old.fingerprint();
        assert_eq!(
            book.get(old.fingerprint()).unwrap().fingerprint(),
            old.fingerprint()
        );
        assert_eq!(e.record(&book).unwrap().actions.len(), 2);

        // Another replica's rules, as the record stream brings them.
        let fresh = RulesBook::new(rules());
        assert_eq!(fresh.get(old.fingerprint()).map(|r| r.fingerprint()), None);
        let fresh = RulesBook::new(rules());
        assert_eq!(fresh.remember(&old.snapshot()), Some(old.fingerprint()));
        assert!(fresh.get(old.fingerprint()).is_some());
    }
}
