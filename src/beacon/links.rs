//! What the beacon does on each interface, for the status page, `status` and `peers`: joined,
//! waiting (named but absent, or up without a usable address), or left. Shared between the beacon
//! loop (the only writer) and the renderers; bounded by [`MAX_LINK_STATES`] entries.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Most interfaces remembered here (joined, waiting and left together); when full, the oldest
/// "left" entry goes first, then the oldest "waiting" one. Each entry is a name and at most a
/// few addresses: well under 1 KiB, so the whole structure stays under 32 KiB.
pub const MAX_LINK_STATES: usize = 32;

/// One interface's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    /// The beacon listens and announces on it.
    Joined,
    /// Named with `--interface` but not there yet, or up without a usable address.
    Waiting,
    /// It was joined and went away (down, removed, or lost its addresses).
    Left,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Joined => "joined",
            Self::Waiting => "waiting",
            Self::Left => "left",
        }
    }
}

/// One interface, as reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkReport {
    pub name: String,
    pub state: LinkState,
    /// What the beacon uses on it: IPv4 addresses, and `fe80::/64` when it has a usable IPv6
    /// link-local address.
    pub addrs: Vec<String>,
    /// Seconds since it entered this state.
    pub since_s: u64,
}

struct Entry {
    state: LinkState,
    addrs: Vec<String>,
    since: Instant,
}

/// The shared interface states.
#[derive(Default)]
pub struct LinkStates {
    inner: Mutex<BTreeMap<String, Entry>>,
    changed: tokio::sync::Notify,
}

impl LinkStates {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `name`'s state; returns true when it changed (state or addresses).
    pub fn set(&self, name: &str, state: LinkState, addrs: Vec<String>, now: Instant) -> bool {
        let mut g = self.lock();
        if let Some(e) = g.get_mut(name) {
            if e.state == state && e.addrs == addrs {
                return false;
            }
            if e.state != state {
                e.since = now;
            }
            e.state = state;
            e.addrs = addrs;
        } else {
            if g.len() >= MAX_LINK_STATES {
                let victim = [LinkState::Left, LinkState::Waiting].iter().find_map(|s| {
                    g.iter()
                        .filter(|(_, e)| e.state == *s)
                        .min_by_key(|(_, e)| e.since)
                        .map(|(n, _)| n.clone())
                });
                match victim {
                    Some(v) => {
                        g.remove(&v);
                    }
                    None => return false,
                }
            }
            g.insert(
                name.to_owned(),
                Entry {
                    state,
                    addrs,
                    since: now,
                },
            );
        }
        drop(g);
        self.changed.notify_waiters();
        true
    }

    /// The state of `name`, if known.
    pub fn get(&self, name: &str) -> Option<LinkState> {
        self.lock().get(name).map(|e| e.state)
    }

    /// Every interface, by name.
    pub fn snapshot(&self, now: Instant) -> Vec<LinkReport> {
        self.lock()
            .iter()
            .map(|(n, e)| LinkReport {
                name: n.clone(),
                state: e.state,
                addrs: e.addrs.clone(),
                since_s: now.duration_since(e.since).as_secs(),
            })
            .collect()
    }

    /// Resolves at the next change.
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn states_change_and_stay_bounded() {
        let s = LinkStates::default();
        let t0 = Instant::now();
        assert!(s.set("eth0", LinkState::Waiting, vec![], t0));
        assert!(!s.set("eth0", LinkState::Waiting, vec![], t0), "no change, no notice");
        assert!(s.set("eth0", LinkState::Joined, vec!["10.0.0.1".into()], t0));
        for i in 0..MAX_LINK_STATES * 2 {
            s.set(&format!("veth{i}"), LinkState::Left, vec![], t0);
        }
        let snap = s.snapshot(t0);
        assert_eq!(snap.len(), MAX_LINK_STATES);
        assert_eq!(s.get("eth0"), Some(LinkState::Joined), "joined links are never evicted");
    }
}
