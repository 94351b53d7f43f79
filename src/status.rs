//! What the cache is doing, three ways: the `GET /` HTML page on the proxy's port, `GET /metrics`
//! (OpenMetrics text, written by the `prometheus-client` crate) and `local-nix-cache status` in
//! the terminal. All three render the proxy's one typed [`StatusReport`], which is also `GET
//! /status.json`; the `status` command reads that JSON back into the same type, so a renamed
//! field is an error, not a silent zero. Anything a peer announced (hostnames) is escaped.

/// The proxy's listener: these pages, and every other request to the proxy itself.
pub struct ProxyWithPages(pub Arc<Proxy>);

impl Handler for ProxyWithPages {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        pages(&self.0, &BeaconStates::default(), req, peer).await
    }
}

/// A node's proxy listener: [`ProxyWithPages`] plus the beacon's interface and seed states in
/// the report.
pub struct NodePages {
    proxy: Arc<Proxy>,
    beacon: BeaconStates,
}

/// What the beacon reports besides the table: its interfaces and its seeds.
#[derive(Clone, Default)]
pub struct BeaconStates {
    pub links: Option<Arc<LinkStates>>,
    pub seeds: Option<Seeds>,
}

impl NodePages {
    pub fn new(proxy: Arc<Proxy>, links: Option<Arc<LinkStates>>, seeds: Option<Seeds>) -> Self {
        Self {
            proxy,
            beacon: BeaconStates { links, seeds },
        }
    }
}

impl Handler for NodePages {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        pages(&self.proxy, &self.beacon, req, peer).await
    }
}

/// The proxy's report, with the interface and seed states when there are some.
pub fn report(proxy: &Proxy, beacon: &BeaconStates) -> StatusReport {
    let mut st = proxy.status();
    if let Some(l) = &beacon.links {
        st.interfaces = l.snapshot(tokio::time::Instant::now());
    }
    if let Some(s) = &beacon.seeds {
        st.seeds = s.snapshot();
    }
    if let (Some(c), Some(_)) = (&st.beacon, &beacon.links) {
        st.diagnosis = diagnose(&st.interfaces, c, st.peers.len(), &st.seeds);
    }
    st
}

async fn pages(proxy: &Arc<Proxy>, beacon: &BeaconStates, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let page = |body: String, content_type: &'static str| h::ok(Bytes::from(body), content_type);
    let mut resp = match (h::is_head(req.method()), req.uri().path()) {
        (Some(_), "/status.json") => page(
            serde_json::to_string(&report(proxy, beacon)).unwrap_or_else(|_| "{}".into()),
            "application/json",
        ),
        (Some(_), "/") => page(html(&report(proxy, beacon)), "text/html; charset=utf-8"),
        (Some(_), "/metrics") => page(
            metrics(&report(proxy, beacon)),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        _ => return proxy.handle(req, peer).await,
    };
    if h::is_head(req.method()) == Some(true) {
        h::strip_for_head(&mut resp);
    }
    resp
}

use std::fmt::Write;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;

use crate::beacon::diagnose::diagnose;
use crate::beacon::seeds::Seeds;
use crate::beacon::{LinkState, LinkStates};
use crate::http::{self as h, Body, Handler};
use crate::proxy::stats::StatusReport;
use crate::proxy::Proxy;

/// Escapes text for HTML.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut i = 0;
    while x >= 1024.0 && i < UNITS.len() - 1 {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", UNITS[i])
    }
}

/// The terminal summary.
pub fn text(st: &StatusReport) -> String {
    let s = &st.stats;
    let mut out = String::new();
    let _ = writeln!(out, "peers: {}", st.peers.len());
    for p in &st.peers {
        let _ = writeln!(
            out,
            "  {:<24} {:<20} ok {:>5}  failed {:>4}{}",
            p.addr,
            p.hostname.as_deref().unwrap_or("-"),
            p.health.successes,
            p.health.failures,
            if p.backed_off { "  (backed off)" } else { "" }
        );
    }
    if !st.interfaces.is_empty() && !st.interfaces.iter().any(|i| i.state == LinkState::Joined) {
        let _ = writeln!(out, "beacon: waiting for a usable network interface");
    }
    for i in &st.interfaces {
        let _ = writeln!(
            out,
            "interface {:<12} {:<8} {} ({} s)",
            i.name,
            i.state.as_str(),
            if i.addrs.is_empty() {
                "-".into()
            } else {
                i.addrs.join(", ")
            },
            i.since_s
        );
    }
    for s in &st.seeds {
        let _ = writeln!(out, "{}", s.line());
    }
    for d in &st.diagnosis {
        let _ = writeln!(out, "problem: {}", d.line());
    }
    for u in st.upstreams.iter().filter(|u| !u.reachable) {
        let _ = writeln!(out, "upstream {} unreachable (skipped for now)", u.url);
    }
    let _ = writeln!(
        out,
        "narinfo: {} from peers, {} from upstream, {} misses",
        s.narinfo_hits_peer, s.narinfo_hits_upstream, s.narinfo_misses
    );
    let _ = writeln!(
        out,
        "NARs: {} from peers ({}), {} from upstream ({}), {} unavailable, {} lies caught",
        s.nars_from_peers,
        human_bytes(s.bytes_from_peers),
        s.nars_from_upstream,
        human_bytes(s.bytes_from_upstream),
        s.nar_failures,
        s.lies
    );
    let _ = writeln!(
        out,
        "bytes saved (not fetched upstream): {}",
        human_bytes(s.bytes_from_peers)
    );
    if !st.recent.is_empty() {
        let _ = writeln!(out, "recent transfers:");
        for t in &st.recent {
            let _ = writeln!(
                out,
                "  {} {} {} {} ms {}{}",
                t.verdict.as_str(),
                t.path,
                human_bytes(t.bytes),
                t.ms,
                t.source,
                t.reason.as_ref().map_or(String::new(), |r| format!(" ({r})"))
            );
        }
    }
    out
}

/// The status page.
pub fn html(st: &StatusReport) -> String {
    let s = &st.stats;
    let mut rows = String::new();
    for p in &st.peers {
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&p.addr),
            escape(p.hostname.as_deref().unwrap_or("-")),
            p.health.successes,
            p.health.failures,
            p.health.latency_ms.map_or("-".into(), |l| format!("{l:.1} ms")),
            if p.backed_off { "backed off" } else { "ok" }
        );
    }
    let mut ifaces = String::new();
    for i in &st.interfaces {
        let _ = write!(
            ifaces,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} s</td></tr>",
            escape(&i.name),
            i.state.as_str(),
            escape(&i.addrs.join(", ")),
            i.since_s
        );
    }
    let mut seeds = String::new();
    for s in &st.seeds {
        let _ = write!(seeds, "<li>{}</li>", escape(&s.line()));
    }
    if !seeds.is_empty() {
        seeds = format!("<h2>Seeds</h2><ul>{seeds}</ul>");
    }
    let mut problems = String::new();
    for d in &st.diagnosis {
        let _ = write!(
            problems,
            "<li>{}<br>fix: {}</li>",
            escape(&d.problem()),
            escape(d.fix())
        );
    }
    if !problems.is_empty() {
        seeds = format!("<h2>Problems</h2><ul>{problems}</ul>{seeds}");
    }
    let mut recent = String::new();
    for t in &st.recent {
        let _ = write!(
            recent,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} ms</td><td>{}</td></tr>",
            escape(&t.path),
            escape(&t.source),
            human_bytes(t.bytes),
            t.ms,
            escape(t.verdict.as_str())
        );
    }
    format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5"><title>local-nix-cache</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border:1px solid #ccc;padding:.3em .7em;text-align:left}}th{{background:#eef}}.big{{font-size:1.4em}}</style></head>
<body><h1>local-nix-cache</h1>
<p class="big">{peers} peer(s) &middot; {saved} saved &middot; {lan} NARs from the LAN, {up} from upstream</p>
<h2>Peers</h2><table><tr><th>address</th><th>host</th><th>served</th><th>failed</th><th>latency</th><th>state</th></tr>{rows}</table>
<h2>Interfaces</h2><table><tr><th>interface</th><th>state</th><th>addresses</th><th>since</th></tr>{ifaces}</table>
{seeds}
<h2>Hits</h2><table><tr><th></th><th>LAN</th><th>upstream</th><th>miss</th></tr>
<tr><th>narinfo</th><td>{ni_lan}</td><td>{ni_up}</td><td>{ni_miss}</td></tr>
<tr><th>NAR</th><td>{lan}</td><td>{up}</td><td>{fail}</td></tr></table>
<p>Lies caught (bad signatures, wrong hashes): {lies}</p>
<h2>Recent transfers</h2><table><tr><th>path</th><th>source</th><th>size</th><th>time</th><th>verdict</th></tr>{recent}</table>
</body></html>
"#,
        peers = st.peers.len(),
        saved = human_bytes(s.bytes_from_peers),
        lan = s.nars_from_peers,
        up = s.nars_from_upstream,
        fail = s.nar_failures,
        ni_lan = s.narinfo_hits_peer,
        ni_up = s.narinfo_hits_upstream,
        ni_miss = s.narinfo_misses,
        lies = s.lies,
    )
}

type Labels = Vec<(String, String)>;

/// A counter family with one label, set from `(label value, count)` pairs.
fn counters(label: &str, samples: &[(&str, u64)]) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    for (value, n) in samples {
        f.get_or_create(&vec![(label.to_owned(), (*value).to_owned())])
            .inc_by(*n);
    }
    f
}

/// Metrics in OpenMetrics text (what Prometheus scrapes), names prefixed `local_nix_cache_`.
pub fn metrics(st: &StatusReport) -> String {
    let s = &st.stats;
    let mut r = Registry::with_prefix("local_nix_cache");
    let peers = Gauge::<i64>::default();
    peers.set(i64::try_from(st.peers.len()).unwrap_or(i64::MAX));
    r.register("peers", "Peers in the beacon's table", peers);
    r.register(
        "narinfo",
        "Narinfo requests answered, by result",
        counters(
            "result",
            &[
                ("peer", s.narinfo_hits_peer),
                ("upstream", s.narinfo_hits_upstream),
                ("miss", s.narinfo_misses),
            ],
        ),
    );
    r.register(
        "nars",
        "NARs delivered after verification, by source; unavailable ones",
        counters(
            "source",
            &[
                ("peer", s.nars_from_peers),
                ("upstream", s.nars_from_upstream),
                ("none", s.nar_failures),
            ],
        ),
    );
    r.register(
        "nar_bytes",
        "NAR bytes fetched, by source",
        counters(
            "source",
            &[("peer", s.bytes_from_peers), ("upstream", s.bytes_from_upstream)],
        ),
    );
    let lies = Counter::<u64>::default();
    lies.inc_by(s.lies);
    r.register("lies", "Answers rejected as false (signature, path, hash)", lies);
    let down = Gauge::<i64>::default();
    down.set(st.upstreams.iter().filter(|u| !u.reachable).count() as i64);
    r.register(
        "upstreams_unreachable",
        "Upstreams skipped after a failed connection",
        down,
    );
    let ifaces = Family::<Labels, Gauge>::default();
    for state in [LinkState::Joined, LinkState::Waiting, LinkState::Left] {
        let n = st.interfaces.iter().filter(|i| i.state == state).count();
        ifaces
            .get_or_create(&vec![("state".to_owned(), state.as_str().to_owned())])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    r.register("beacon_interfaces", "The beacon's interfaces, by state", ifaces);
    if let Some(b) = &st.beacon {
        r.register(
            "beacon_datagrams",
            "Beacon datagrams, by what became of them",
            counters(
                "kind",
                &[
                    ("received", b.received),
                    ("announces", b.announces),
                    ("queries", b.queries),
                    ("goodbyes", b.goodbyes),
                    ("too_short", b.too_short),
                    ("invalid", b.invalid),
                    ("wrong_version", b.wrong_version),
                    ("own", b.own),
                    ("rate_limited", b.rate_limited),
                    ("table_full", b.table_full),
                    ("expired", b.expired),
                    ("off_link", b.off_link),
                ],
            ),
        );
    }
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &r) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot reach the proxy at {url}: {source} (is `local-nix-cache serve` running?)")]
    Fetch {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} did not answer a status report: {source}")]
    Json {
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

/// `local-nix-cache status`: fetches the proxy's report and prints it (as JSON with `json`).
pub async fn print(proxy: &str, json: bool) -> Result<(), StatusError> {
    let url = format!("{}/status.json", proxy.trim_end_matches('/'));
    let fetch = async {
        reqwest::Client::builder()
            .no_proxy()
            .timeout(std::time::Duration::from_secs(5))
            .build()?
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await
    };
    let body = fetch.await.map_err(|source| StatusError::Fetch {
        url: url.clone(),
        source,
    })?;
    let st: StatusReport = serde_json::from_slice(&body).map_err(|source| StatusError::Json { url, source })?;
    if json {
        println!("{}", serde_json::to_string(&st).unwrap_or_default());
    } else {
        print!("{}", text(&st));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::beacon::LinkReport;
    use crate::proxy::stats::Stats;

    /// Every renderer shows the beacon's interfaces and their states.
    #[test]
    fn interfaces_are_shown_with_their_state() {
        let link = |name: &str, state, addrs: &[&str]| LinkReport {
            name: name.into(),
            state,
            addrs: addrs.iter().map(|a| (*a).to_owned()).collect(),
            since_s: 7,
        };
        let mut st = StatusReport {
            peers: vec![],
            stats: Stats::default(),
            recent: vec![],
            beacon: None,
            upstreams: vec![],
            interfaces: vec![
                link("eth0", LinkState::Joined, &["10.0.0.2", "fe80::/64"]),
                link("wlan0", LinkState::Waiting, &[]),
                link("usb0", LinkState::Left, &[]),
            ],
            seeds: vec![],
            diagnosis: vec![],
            summary_bytes: 0,
        };
        let t = text(&st);
        assert!(
            t.contains("interface eth0") && t.contains("joined") && t.contains("10.0.0.2, fe80::/64"),
            "{t}"
        );
        assert!(t.contains("interface wlan0") && t.contains("waiting"), "{t}");
        assert!(t.contains("interface usb0") && t.contains("left"), "{t}");
        let h = html(&st);
        assert!(
            h.contains("<td>eth0</td><td>joined</td><td>10.0.0.2, fe80::/64</td>"),
            "{h}"
        );
        assert!(h.contains("<td>usb0</td><td>left</td>"), "{h}");
        let m = metrics(&st);
        for s in ["joined", "waiting", "left"] {
            assert!(
                m.contains(&format!("local_nix_cache_beacon_interfaces{{state=\"{s}\"}} 1")),
                "{m}"
            );
        }
        // Only waiting and left: the terminal says the beacon waits for a network.
        st.interfaces.remove(0);
        assert!(text(&st).contains("waiting for a usable network interface"));
        // A report from a proxy without the field still reads (older `serve`).
        let mut v = serde_json::to_value(&st).expect("json");
        v.as_object_mut().expect("object").remove("interfaces");
        let back: StatusReport = serde_json::from_value(v).expect("reads without interfaces");
        assert!(back.interfaces.is_empty());
    }

    /// The terminal and the page show each seed and each diagnosis with its fix; a report
    /// without them (an older `serve`) still reads.
    #[test]
    fn seeds_and_problems_are_shown_with_their_fix() {
        use crate::beacon::diagnose::Diagnosis;
        use crate::beacon::seeds::{SeedReport, SeedState};
        let seed = SeedReport {
            seed: "10.0.0.5:8380".into(),
            state: SeedState::Failing,
            node: None,
            addr: None,
            listed: 0,
            reachable: 0,
            unreachable: 0,
            failures: 3,
            error: Some("answered HTTP 404 to GET /peers: not a local-nix-cache store server".into()),
        };
        let st = StatusReport {
            peers: vec![],
            stats: Stats::default(),
            recent: vec![],
            beacon: None,
            upstreams: vec![],
            interfaces: vec![],
            seeds: vec![seed],
            diagnosis: vec![Diagnosis::PeersUnreachable { count: 2 }],
            summary_bytes: 0,
        };
        let t = text(&st);
        assert!(
            t.contains("seed 10.0.0.5:8380: failing (3 in a row): answered HTTP 404"),
            "{t}"
        );
        assert!(
            t.contains("problem: 2 peer(s) listed by a seed do not answer over TCP"),
            "{t}"
        );
        assert!(t.contains("fix: use a venue cache"), "{t}");
        let h = html(&st);
        assert!(h.contains("<h2>Problems</h2>") && h.contains("<h2>Seeds</h2>"), "{h}");
        let mut v = serde_json::to_value(&st).expect("json");
        let o = v.as_object_mut().expect("object");
        o.remove("seeds");
        o.remove("diagnosis");
        let back: StatusReport = serde_json::from_value(v).expect("reads without them");
        assert!(back.seeds.is_empty() && back.diagnosis.is_empty());
    }
}
