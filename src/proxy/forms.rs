//! Which form a NAR crosses the LAN in, per peer: plain, or zstd-compressed on the fly by the
//! peer (`.nar.zst`, `server::compress`), learnt from how fast each form delivered.
//!
//! zstd wins where the link is the bottleneck (fewer bytes on the wire: 1.53x of direct on a
//! 1 Gbit/s link for a closure of real binaries, issue #16) and loses where the CPU is (the peer's
//! encoder and the proxy's decoder share the cores Nix imports with: 0.71x unshaped, where plain
//! was 1.00x). Which one a host is in depends on its link and its load, so with
//! `peer-compression = "auto"` (the default) the proxy measures: each fetch from a peer of a NAR
//! of at least [`MEASURE_MIN_BYTES`], from its start, gives a goodput sample for its form (NAR
//! bytes delivered, decompressed, per second from the request to the end; a failed fetch counts
//! what it delivered, so a form that keeps failing looks slow). A form's goodput is the median of
//! its last [`SAMPLES_KEPT`] samples (one slow start or one lucky burst does not decide). Until
//! both forms have [`FIRST_TRIALS`] measurable fetches started, measurable fetches alternate;
//! after that the form with the higher goodput is used (zstd only by a margin, [`ZSTD_MARGIN`]:
//! it costs CPU a transfer's goodput does not show), and every [`EXPLORE_EVERY`]th measurable
//! fetch tries the other form, so a change (the laptop moved from cable to Wi-Fi, the peer got
//! busy) is seen. NARs over [`TRIAL_MAX_BYTES`] are never tried in the other form: they go in the
//! faster one (zstd while nothing is known).
//! NARs under the zstd threshold ([`super::source::PEER_ZSTD_MIN_BYTES`]) are always plain;
//! resumed and split fetches are plain (they use byte ranges). `"zstd"` and `"none"` fix the form.
//!
//! A peer decides its own speed: a peer can make either form look slow, which only makes the
//! proxy pick the other one from that peer. Samples are per peer, so one peer cannot steer how
//! another is fetched.
//!
//! Limits: a sample is one transfer's goodput, whatever else ran beside it. On a shared link
//! each transfer gets its share of the wire whatever its form, so the comparison holds there;
//! when the CPU is the bottleneck, a lone transfer of the other form (an exploration among many of
//! the chosen one) shows its own extra work, not all of what switching every transfer would cost.
//! Another peer's transfers load the same link and CPU, so they change this peer's samples, not
//! which peer they belong to.
//!
//! Bounds: [`MAX_TRACKED_PEERS`] peers (LRU), about 120 bytes each with the map: under 600 KiB.

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
/// NARs larger than this are never a trial nor an exploration (a plain trial of a 1 GiB NAR
/// over a slow link would cost seconds): they go in the faster form, zstd while nothing is
/// known, and still give a sample.
pub const TRIAL_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Measurable fetches of each form started before the faster form is chosen.
pub const FIRST_TRIALS: u32 = 2;
/// Once chosen, every this many measurable fetches from a peer, one tries the other form.
pub const EXPLORE_EVERY: u32 = 8;
/// zstd is preferred only when its goodput is at least this multiple of plain's. It costs CPU
/// on both hosts that a transfer's own goodput does not show: when the CPUs bind (16 NARs at
/// once on a fast link), one zstd transfer among many looks as fast as a plain one while all of
/// them together load the cores Nix imports with (issue #16: a closure with 16 at once, unshaped,
/// went half zstd without this margin). Where the link binds, zstd's gain is the compression
/// ratio of the NARs (about 2-3x for binaries), well above the margin.
pub const ZSTD_MARGIN: f64 = 1.25;
/// Samples a form's goodput is the median of (the latest).
pub const SAMPLES_KEPT: usize = 5;
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
    /// Goodput, bytes per second: the median of the kept samples (none until one ended).
    pub bytes_per_s: Option<f64>,
    /// The last samples, bytes per second (a ring; unused slots are 0 beyond `kept`).
    #[serde(skip)]
    samples: [f32; SAMPLES_KEPT],
    #[serde(skip)]
    kept: u8,
    #[serde(skip)]
    next: u8,
}

impl FormRate {
    fn add(&mut self, rate: f64) {
        self.samples[usize::from(self.next)] = rate as f32;
        self.next = (self.next + 1) % SAMPLES_KEPT as u8;
        self.kept = (self.kept + 1).min(SAMPLES_KEPT as u8);
        let mut sorted = self.samples;
        let v = &mut sorted[..usize::from(self.kept)];
        v.sort_by(f32::total_cmp);
        let n = v.len();
        let mid = if n % 2 == 1 {
            f64::from(v[n / 2])
        } else {
            (f64::from(v[n / 2 - 1]) + f64::from(v[n / 2])) / 2.0
        };
        self.bytes_per_s = Some(mid);
    }
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

    /// The form to prefer by the samples so far (`None`: a form has none yet): zstd only when it
    /// delivered [`ZSTD_MARGIN`] times plain's goodput.
    pub fn preferred(&self) -> Option<Form> {
        let (p, z) = (self.plain.bytes_per_s?, self.zstd.bytes_per_s?);
        Some(if z > p * ZSTD_MARGIN { Form::Zstd } else { Form::Plain })
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
        if !(MEASURE_MIN_BYTES..=TRIAL_MAX_BYTES).contains(&nar_size) {
            // No trial: the best known form, zstd (fewer bytes) before anything is known.
            return r.preferred().unwrap_or(Form::Zstd);
        }
        let form = match r.preferred() {
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

    /// A fetch of a NAR of `nar_size` bytes in `form` from `node`, from its start, ended after
    /// `took` with `delivered` bytes (decompressed; all of them, unless it failed).
    pub fn record(&self, node: &NodeId, form: Form, nar_size: u64, delivered: u64, took: Duration) {
        if nar_size < MEASURE_MIN_BYTES || self.setting != PeerCompression::Auto {
            return;
        }
        let rate = delivered as f64 / took.as_secs_f64().max(1e-6);
        let mut peers = self.peers();
        peers.get_or_insert_mut(*node, PeerRates::default).of(form).add(rate);
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
            f.record(node, form, 4 * MIB, 4 * MIB, Duration::from_secs_f64(4.0 / rate));
        }
        zstd
    }

    #[test]
    fn the_faster_form_wins_and_the_other_is_still_tried_now_and_then() {
        let f = PeerForms::new(PeerCompression::Auto, MIN);
        let (slow_link, fast_link) = (NodeId([1; 16]), NodeId([2; 16]));
        // A link where zstd delivers 3x faster: trials first (zstd, plain, zstd, plain), then
        // zstd but for every 8th.
        let firsts: Vec<Form> = (0..4).map(|_| f.choose(&slow_link, 4 * MIB)).collect();
        assert_eq!(firsts, [Form::Zstd, Form::Plain, Form::Zstd, Form::Plain]);
        for form in firsts {
            let mibs = if form == Form::Zstd { 300.0 } else { 100.0 };
            f.record(&slow_link, form, 4 * MIB, 4 * MIB, Duration::from_secs_f64(4.0 / mibs));
        }
        let z = run(&f, &slow_link, 80, 100.0, 300.0);
        assert_eq!(z, 70, "zstd where it is faster, plain every 8th");
        // A link where plain does.
        let p = 80 - run(&f, &fast_link, 80, 600.0, 250.0);
        assert!((66..=72).contains(&p), "mostly plain where it is faster: {p} of 80");
        // The link changes: seen once three explorations outvote the old samples.
        let after = run(&f, &fast_link, 80, 100.0, 300.0);
        assert!((45..=72).contains(&after), "follows a change: {after} of 80 zstd");
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
        auto.record(&n, Form::Plain, 8 * MIB, 8 * MIB, Duration::from_millis(10));
        auto.record(&n, Form::Zstd, 8 * MIB, 8 * MIB, Duration::from_millis(100));
        assert_eq!(auto.choose(&n, MIB - 1), Form::Plain);
        auto.record(&n, Form::Zstd, MIB - 1, MIB - 1, Duration::from_secs(100));
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
    fn one_outlier_does_not_decide_and_a_failing_form_loses() {
        let f = PeerForms::new(PeerCompression::Auto, MIN);
        let n = NodeId([7; 16]);
        // zstd's first fetch met a slow start (10x slower than its usual); plain is 2x slower
        // than zstd's usual. After the trials, zstd is chosen.
        let took = |mibs: f64| Duration::from_secs_f64(4.0 / mibs);
        let trials = [
            (Form::Zstd, 20.0),
            (Form::Plain, 100.0),
            (Form::Zstd, 200.0),
            (Form::Plain, 100.0),
        ];
        for (want, mibs) in trials {
            assert_eq!(f.choose(&n, 4 * MIB), want);
            f.record(&n, want, 4 * MIB, 4 * MIB, took(mibs));
        }
        f.record(&n, Form::Zstd, 4 * MIB, 4 * MIB, took(200.0));
        assert_eq!(f.choose(&n, 4 * MIB), Form::Zstd, "{:?}", f.rates(&n));
        // A zstd form that fails every time (nothing delivered) loses to plain, and is not
        // alternated with for ever.
        let g = PeerForms::new(PeerCompression::Auto, MIN);
        let forms: Vec<Form> = (0..24)
            .map(|_| {
                let form = g.choose(&n, 4 * MIB);
                let got = if form == Form::Zstd { 0 } else { 4 * MIB };
                g.record(&n, form, 4 * MIB, got, took(50.0));
                form
            })
            .collect();
        let zstd = forms.iter().filter(|x| **x == Form::Zstd).count();
        assert!(zstd <= 2 + 24 / EXPLORE_EVERY as usize, "{forms:?}");
    }

    #[test]
    fn zstd_must_win_by_a_margin() {
        // zstd 10 % faster per transfer (CPU-bound: its cost is elsewhere): plain.
        let f = PeerForms::new(PeerCompression::Auto, MIN);
        let n = NodeId([9; 16]);
        let z = run(&f, &n, 40, 100.0, 110.0);
        assert!(z <= 2 + 40 / EXPLORE_EVERY as usize, "{z} of 40 zstd");
        // 1.5x faster (a link that binds, compressible NARs): zstd.
        let m = NodeId([10; 16]);
        let z = run(&f, &m, 40, 100.0, 150.0);
        assert!(z >= 30, "{z} of 40 zstd");
    }

    #[test]
    fn huge_nars_are_never_trials() {
        let f = PeerForms::new(PeerCompression::Auto, MIN);
        let n = NodeId([8; 16]);
        let huge = TRIAL_MAX_BYTES + 1;
        assert_eq!(f.choose(&n, huge), Form::Zstd, "nothing known: zstd");
        f.record(&n, Form::Zstd, huge, huge, Duration::from_secs(10));
        assert_eq!(f.choose(&n, huge), Form::Zstd, "no plain trial of a huge NAR");
        assert_eq!(f.rates(&n).map(|r| (r.zstd.started, r.plain.started)), Some((0, 0)));
        // Once plain is known faster, huge NARs go plain, with no exploration among them.
        run(&f, &n, 12, 500.0, 50.0);
        assert!((0..3 * EXPLORE_EVERY).all(|_| f.choose(&n, huge) == Form::Plain));
    }

    #[test]
    fn peers_are_learnt_apart() {
        let f = PeerForms::new(PeerCompression::Auto, MIN);
        let (a, b) = (NodeId([5; 16]), NodeId([6; 16]));
        run(&f, &a, 20, 500.0, 50.0);
        assert_eq!(f.rates(&a).and_then(|r| r.preferred()), Some(Form::Plain));
        assert_eq!(f.rates(&b), None, "another peer's samples do not count");
        assert_eq!(f.choose(&b, 4 * MIB), Form::Zstd, "b starts with its own trials");
    }
}
