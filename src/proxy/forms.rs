//! Which form a NAR crosses the LAN in, per peer: plain, or zstd-compressed on the fly by the
//! peer (`.nar.zst`, `server::compress`), learnt from how fast each form delivered.
//!
//! zstd wins where the link is the bottleneck (fewer bytes on the wire: 1.53x of direct on a
//! 1 Gbit/s link for a closure of real binaries, issue #16) and loses where the CPU is (the peer's
//! encoder and the proxy's decoder share the cores Nix imports with: 0.71x unshaped, where plain
//! was 1.00x). Which one a host is in depends on its link and its load, so with
//! `peer-compression = "auto"` (the default) the proxy measures: each NAR of at least
//! [`MEASURE_MIN_BYTES`] fetched whole from a peer gives a goodput sample (NAR bytes per second,
//! decompressed, from the request to the last byte) for its form. Until both forms have
//! [`FIRST_TRIALS`] measurable fetches started, measurable fetches alternate; after that the form
//! with the higher smoothed goodput is used, and every [`EXPLORE_EVERY`]th measurable fetch tries
//! the other form, so a change (the laptop moved from cable to Wi-Fi, the peer got busy) is seen.
//! NARs under the zstd threshold ([`super::source::PEER_ZSTD_MIN_BYTES`]) are always plain;
//! resumed and split fetches are plain (they use byte ranges). `"zstd"` and `"none"` fix the form.
//!
//! A peer decides its own speed: a peer can make either form look slow, which only makes the
//! proxy pick the other one from that peer. Samples are per peer, so one peer cannot steer how
//! another is fetched.
//!
//! Limits: a sample is one transfer's goodput, whatever else ran beside it (with 16 NARs at once
//! each gets a share of the link); both forms are sampled under the same mix, so the comparison
//! holds on average, not per sample.
//!
//! Bounds: [`MAX_TRACKED_PEERS`] peers (LRU), about 80 bytes each: under 400 KiB.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::Duration;

use lru::LruCache;
use serde::{Deserialize, Serialize};

use crate::beacon::wire::NodeId;
use crate::settings::PeerCompression;

/// A NAR fetched whole from a peer gives a goodput sample when it is at least this large (below,
/// the request's latency outweighs the link's rate).
pub const MEASURE_MIN_BYTES: u64 = 1024 * 1024;
/// Measurable fetches of each form started before the faster form is chosen.
pub const FIRST_TRIALS: u32 = 2;
/// Once chosen, every this many measurable fetches from a peer, one tries the other form.
pub const EXPLORE_EVERY: u32 = 8;
/// Weight of a new sample in a form's smoothed goodput.
pub const SAMPLE_WEIGHT: f64 = 0.3;
/// Peers whose samples are kept (least recently used forgotten first).
pub const MAX_TRACKED_PEERS: usize = 4096;

/// The form a NAR is fetched in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Form {
    Plain,
    Zstd,
}

impl Form {
    fn other(self) -> Self {
        match self {
            Self::Plain => Self::Zstd,
            Self::Zstd => Self::Plain,
        }
    }
}

/// What one form delivered from one peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FormRate {
    /// Measurable fetches started in this form.
    pub started: u32,
    /// Smoothed goodput, bytes per second (none until one finished).
    pub bytes_per_s: Option<f64>,
}

/// The samples of one peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerRates {
    pub plain: FormRate,
    pub zstd: FormRate,
    /// Measurable fetches since one last tried the slower form.
    #[serde(skip)]
    since_explore: u32,
}

impl PeerRates {
    fn of(&mut self, f: Form) -> &mut FormRate {
        match f {
            Form::Plain => &mut self.plain,
            Form::Zstd => &mut self.zstd,
        }
    }

    /// The faster form by the samples so far (`None`: a form has none yet).
    pub fn faster(&self) -> Option<Form> {
        let (p, z) = (self.plain.bytes_per_s?, self.zstd.bytes_per_s?);
        Some(if z > p { Form::Zstd } else { Form::Plain })
    }
}

/// The per-peer choice of form.
pub struct PeerForms {
    setting: PeerCompression,
    /// NARs under this size are fetched plain.
    zstd_min_bytes: u64,
    peers: Mutex<LruCache<NodeId, PeerRates>>,
}

impl PeerForms {
    pub fn new(setting: PeerCompression, zstd_min_bytes: u64) -> Self {
        Self {
            setting,
            zstd_min_bytes,
            peers: Mutex::new(LruCache::new(
                NonZeroUsize::new(MAX_TRACKED_PEERS).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, LruCache<NodeId, PeerRates>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The form to fetch a NAR of `nar_size` bytes in from `node`, which offers zstd. Counts the
    /// fetch as started when it is measurable.
    pub fn choose(&self, node: &NodeId, nar_size: u64) -> Form {
        if nar_size < self.zstd_min_bytes {
            return Form::Plain;
        }
        match self.setting {
            PeerCompression::None => return Form::Plain,
            PeerCompression::Zstd => return Form::Zstd,
            PeerCompression::Auto => {}
        }
        let mut peers = self.peers();
        let r = peers.get_or_insert_mut(*node, PeerRates::default);
        if nar_size < MEASURE_MIN_BYTES {
            // Not a sample: the best known form, zstd (fewer bytes) before anything is known.
            return r.faster().unwrap_or(Form::Zstd);
        }
        let form = match r.faster() {
            Some(best) if r.plain.started >= FIRST_TRIALS && r.zstd.started >= FIRST_TRIALS => {
                r.since_explore += 1;
                if r.since_explore >= EXPLORE_EVERY {
                    r.since_explore = 0;
                    best.other()
                } else {
                    best
                }
            }
            // Trials: the form started fewer times (zstd first).
            _ if r.plain.started < r.zstd.started => Form::Plain,
            _ => Form::Zstd,
        };
        let f = r.of(form);
        f.started = f.started.saturating_add(1);
        form
    }

    /// A fetch of `bytes` (decompressed) in `form` from `node` finished whole in `took`.
    pub fn record(&self, node: &NodeId, form: Form, bytes: u64, took: Duration) {
        if bytes < MEASURE_MIN_BYTES || self.setting != PeerCompression::Auto {
            return;
        }
        let rate = bytes as f64 / took.as_secs_f64().max(1e-6);
        let mut peers = self.peers();
        let f = peers.get_or_insert_mut(*node, PeerRates::default).of(form);
        f.bytes_per_s = Some(match f.bytes_per_s {
            Some(old) => old * (1.0 - SAMPLE_WEIGHT) + rate * SAMPLE_WEIGHT,
            None => rate,
        });
    }

    /// What was learnt about `node` (for reports).
    pub fn rates(&self, node: &NodeId) -> Option<PeerRates> {
        self.peers().peek(node).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;
    const MIN: u64 = 256 * 1024;

    /// Fetches `n` NARs of 4 MiB from `node`, each form delivering at its given rate (MiB/s);
    /// returns how many went zstd.
    fn run(f: &PeerForms, node: &NodeId, n: usize, plain_mibs: f64, zstd_mibs: f64) -> usize {
        let mut zstd = 0;
        for _ in 0..n {
            let form = f.choose(node, 4 * MIB);
            let rate = if form == Form::Zstd { zstd_mibs } else { plain_mibs };
            zstd += usize::from(form == Form::Zstd);
            f.record(node, form, 4 * MIB, Duration::from_secs_f64(4.0 / rate));
        }
        zstd
    }

    #[test]
    fn the_faster_form_wins_and_the_other_is_still_tried_now_and_then() {
        let f = PeerForms::new(PeerCompression::Auto, MIN);
        let (slow_link, fast_link) = (NodeId([1; 16]), NodeId([2; 16]));
        // Trials first: zstd, plain, zstd, plain.
        let firsts: Vec<Form> = (0..4)
            .map(|_| {
                let form = f.choose(&slow_link, 4 * MIB);
                f.record(&slow_link, form, 4 * MIB, Duration::from_secs(1));
                form
            })
            .collect();
        assert_eq!(firsts, [Form::Zstd, Form::Plain, Form::Zstd, Form::Plain]);
        // A link where zstd delivers 3x faster, and one where plain does.
        let z = run(&f, &slow_link, 80, 100.0, 300.0);
        assert!((60..=72).contains(&z), "mostly zstd where it is faster: {z} of 80");
        let p = 80 - run(&f, &fast_link, 80, 600.0, 250.0);
        assert!((60..=72).contains(&p), "mostly plain where it is faster: {p} of 80");
        // The link changes: the exploration notices within a few rounds.
        let after = run(&f, &fast_link, 80, 100.0, 300.0);
        assert!((56..=72).contains(&after), "follows a change: {after} of 80 zstd");
    }

    #[test]
    fn a_burst_of_concurrent_fetches_trials_both_forms() {
        // Sixteen fetches start before any finished: they alternate, zstd first, until each
        // form has had its trials.
        let f = PeerForms::new(PeerCompression::Auto, MIN);
        let n = NodeId([3; 16]);
        let forms: Vec<Form> = (0..16).map(|_| f.choose(&n, 4 * MIB)).collect();
        let zstd = forms.iter().filter(|x| **x == Form::Zstd).count();
        assert_eq!(zstd, 8, "{forms:?}");
        assert_eq!(forms[0], Form::Zstd);
    }

    #[test]
    fn small_nars_and_fixed_settings_are_not_learnt() {
        let auto = PeerForms::new(PeerCompression::Auto, MIN);
        let n = NodeId([4; 16]);
        assert_eq!(auto.choose(&n, MIN - 1), Form::Plain, "under the threshold: plain");
        assert_eq!(auto.choose(&n, MIN), Form::Zstd, "nothing known: zstd");
        assert_eq!(auto.rates(&n).map(|r| r.zstd.started), Some(0), "not a trial");
        // Once plain is known faster, mid-sized NARs follow it without being counted.
        auto.record(&n, Form::Plain, 8 * MIB, Duration::from_millis(10));
        auto.record(&n, Form::Zstd, 8 * MIB, Duration::from_millis(100));
        assert_eq!(auto.choose(&n, MIB - 1), Form::Plain);
        auto.record(&n, Form::Zstd, MIB - 1, Duration::from_secs(100));
        assert!(
            auto.rates(&n)
                .and_then(|r| r.zstd.bytes_per_s)
                .is_some_and(|r| r > 8.0 * MIB as f64),
            "a NAR under MEASURE_MIN_BYTES is no sample"
        );
        for (setting, want) in [
            (PeerCompression::Zstd, Form::Zstd),
            (PeerCompression::None, Form::Plain),
        ] {
            let f = PeerForms::new(setting, MIN);
            let z = run(&f, &n, 20, 1.0, 1.0);
            assert_eq!(z, if want == Form::Zstd { 20 } else { 0 }, "{setting:?}");
            assert_eq!(f.rates(&n), None, "{setting:?}: nothing learnt");
        }
    }

    #[test]
    fn peers_are_learnt_apart() {
        let f = PeerForms::new(PeerCompression::Auto, MIN);
        let (a, b) = (NodeId([5; 16]), NodeId([6; 16]));
        run(&f, &a, 20, 500.0, 50.0);
        assert_eq!(f.rates(&a).and_then(|r| r.faster()), Some(Form::Plain));
        assert_eq!(f.rates(&b), None, "another peer's samples do not count");
        assert_eq!(f.choose(&b, 4 * MIB), Form::Zstd, "b starts with its own trials");
    }
}
