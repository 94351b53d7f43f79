//! What the seeds are doing, for people: each seed's [`SeedReport`], held in [`Seeds`], the
//! handle the beacon's seed task writes and the status page and the `peers` tool read.

use std::sync::{Arc, Mutex};

use super::seed::Seed;

/// Most seeds used (further `--peer` values are ignored, with a warning).
pub const MAX_SEEDS: usize = 32;

/// Where a seed stands, for the status page and the `peers` tool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeedState {
    /// Not asked yet.
    Pending,
    /// Its last answer was a peer list.
    Ok,
    /// Its last try failed; retried with back-off.
    Failing,
}

impl SeedState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Ok => "ok",
            Self::Failing => "failing",
        }
    }
}

/// One seed as reported.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SeedReport {
    /// The seed as given (`HOST:PORT`).
    pub seed: String,
    pub state: SeedState,
    /// The node id its store server named, when it answered.
    pub node: Option<String>,
    /// The address it answered at.
    pub addr: Option<String>,
    /// Entries in its last list (at most [`MAX_SEED_ENTRIES`] counted).
    pub listed: usize,
    /// Of those, how many this host could reach (their store server named the listed id).
    pub reachable: usize,
    /// Of those, how many could not be reached over TCP (client isolation, a firewall).
    pub unreachable: usize,
    /// Failures in a row.
    pub failures: u32,
    /// The last failure, while failing.
    pub error: Option<String>,
}

impl SeedReport {
    fn pending(seed: &Seed) -> Self {
        Self {
            seed: seed.to_string(),
            state: SeedState::Pending,
            node: None,
            addr: None,
            listed: 0,
            reachable: 0,
            unreachable: 0,
            failures: 0,
            error: None,
        }
    }

    /// One line for the `peers` tool and the terminal status.
    pub fn line(&self) -> String {
        match self.state {
            SeedState::Pending => format!("seed {}: not asked yet", self.seed),
            SeedState::Ok => format!(
                "seed {}: ok (node {}), lists {} peer(s): {} reachable, {} unreachable over TCP",
                self.seed,
                self.node.as_deref().unwrap_or("-"),
                self.listed,
                self.reachable,
                self.unreachable
            ),
            SeedState::Failing => format!(
                "seed {}: failing ({} in a row): {}",
                self.seed,
                self.failures,
                self.error.as_deref().unwrap_or("-")
            ),
        }
    }
}

/// The seeds and their reported states, shared by the beacon (which asks them) and whoever
/// reports them (status page, `peers` tool).
#[derive(Clone, Debug, Default)]
pub struct Seeds {
    list: Arc<[Seed]>,
    reports: Arc<Mutex<Vec<SeedReport>>>,
    /// Woken when the network changed (a new link, a wake-up): every seed is asked again at
    /// once, whatever its back-off.
    nudge: Arc<tokio::sync::Notify>,
}

impl Seeds {
    /// The first [`MAX_SEEDS`] of `list` (duplicates dropped).
    pub fn new(list: Vec<Seed>) -> Self {
        let mut uniq: Vec<Seed> = Vec::new();
        for s in list {
            if !uniq.contains(&s) {
                uniq.push(s);
            }
        }
        if uniq.len() > MAX_SEEDS {
            tracing::warn!("only the first {MAX_SEEDS} of {} seeds are used", uniq.len());
            uniq.truncate(MAX_SEEDS);
        }
        let reports = uniq.iter().map(SeedReport::pending).collect();
        Self {
            list: uniq.into(),
            reports: Arc::new(Mutex::new(reports)),
            nudge: Arc::default(),
        }
    }

    pub fn list(&self) -> &[Seed] {
        &self.list
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Every seed's current report.
    pub fn snapshot(&self) -> Vec<SeedReport> {
        self.reports.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The network changed: ask every seed again now (a laptop that joined a network after a
    /// run of failures does not wait out its back-off). Several nudges before the seed task
    /// looks count as one.
    pub fn nudge(&self) {
        self.nudge.notify_one();
    }

    /// Resolves at the next [`Self::nudge`] (or at once if one came since the last).
    pub(super) async fn nudged(&self) {
        self.nudge.notified().await
    }

    pub(super) fn set(&self, i: usize, r: SeedReport) {
        if let Some(slot) = self.reports.lock().unwrap_or_else(|p| p.into_inner()).get_mut(i) {
            *slot = r;
        }
    }
}
