//! What the cache is doing, three ways: the proxy's `GET /` HTML page, `GET /metrics` in
//! Prometheus text format, and `local-nix-cache status` in the terminal. All render the same
//! JSON summary (`GET /status.json`). Anything a peer announced (hostnames) is escaped.

use std::fmt::Write;

use serde_json::Value;

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

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
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
pub fn text(st: &Value) -> String {
    let s = &st["stats"];
    let mut out = String::new();
    let peers = st["peers"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "peers: {}", peers.len());
    for p in &peers {
        let h = &p["health"];
        let _ = writeln!(
            out,
            "  {:<24} {:<20} ok {:>5}  failed {:>4}{}",
            p["addr"].as_str().unwrap_or("?"),
            p["hostname"].as_str().unwrap_or("-"),
            u(h, "successes"),
            u(h, "failures"),
            if p["backed_off"].as_bool().unwrap_or(false) {
                "  (backed off)"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(
        out,
        "narinfo: {} from peers, {} from upstream, {} misses",
        u(s, "narinfo_hits_peer"),
        u(s, "narinfo_hits_upstream"),
        u(s, "narinfo_misses")
    );
    let _ = writeln!(
        out,
        "NARs: {} from peers ({}), {} from upstream ({}), {} unavailable, {} lies caught",
        u(s, "nars_from_peers"),
        human_bytes(u(s, "bytes_from_peers")),
        u(s, "nars_from_upstream"),
        human_bytes(u(s, "bytes_from_upstream")),
        u(s, "nar_failures"),
        u(s, "lies")
    );
    let _ = writeln!(
        out,
        "bytes saved (not fetched upstream): {}",
        human_bytes(u(s, "bytes_from_peers"))
    );
    if let Some(recent) = st["recent"].as_array().filter(|r| !r.is_empty()) {
        let _ = writeln!(out, "recent transfers:");
        for t in recent {
            let _ = writeln!(
                out,
                "  {} {} {} {} ms {}",
                t["verdict"].as_str().unwrap_or("?"),
                t["path"].as_str().unwrap_or("?"),
                human_bytes(u(t, "bytes")),
                u(t, "ms"),
                t["source"].as_str().unwrap_or("")
            );
        }
    }
    out
}

/// The status page.
pub fn html(st: &Value) -> String {
    let s = &st["stats"];
    let mut rows = String::new();
    for p in st["peers"].as_array().cloned().unwrap_or_default() {
        let h = &p["health"];
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(p["addr"].as_str().unwrap_or("?")),
            escape(p["hostname"].as_str().unwrap_or("-")),
            u(h, "successes"),
            u(h, "failures"),
            h["latency_ms"].as_f64().map_or("-".into(), |l| format!("{l:.1} ms")),
            if p["backed_off"].as_bool().unwrap_or(false) {
                "backed off"
            } else {
                "ok"
            }
        );
    }
    let mut recent = String::new();
    for t in st["recent"].as_array().cloned().unwrap_or_default() {
        let _ = write!(
            recent,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} ms</td><td>{}</td></tr>",
            escape(t["path"].as_str().unwrap_or("?")),
            escape(t["source"].as_str().unwrap_or("")),
            human_bytes(u(&t, "bytes")),
            u(&t, "ms"),
            escape(t["verdict"].as_str().unwrap_or("?"))
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
<h2>Hits</h2><table><tr><th></th><th>LAN</th><th>upstream</th><th>miss</th></tr>
<tr><th>narinfo</th><td>{ni_lan}</td><td>{ni_up}</td><td>{ni_miss}</td></tr>
<tr><th>NAR</th><td>{lan}</td><td>{up}</td><td>{fail}</td></tr></table>
<p>Lies caught (bad signatures, wrong hashes): {lies}</p>
<h2>Recent transfers</h2><table><tr><th>path</th><th>source</th><th>size</th><th>time</th><th>verdict</th></tr>{recent}</table>
</body></html>
"#,
        peers = st["peers"].as_array().map_or(0, Vec::len),
        saved = human_bytes(u(s, "bytes_from_peers")),
        lan = u(s, "nars_from_peers"),
        up = u(s, "nars_from_upstream"),
        fail = u(s, "nar_failures"),
        ni_lan = u(s, "narinfo_hits_peer"),
        ni_up = u(s, "narinfo_hits_upstream"),
        ni_miss = u(s, "narinfo_misses"),
        lies = u(s, "lies"),
    )
}

/// Prometheus text exposition.
pub fn metrics(st: &Value) -> String {
    let s = &st["stats"];
    let b = &st["beacon"];
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(
            out,
            "# HELP local_nix_cache_{name} {help}\n# TYPE local_nix_cache_{name} {kind}"
        );
        for (labels, v) in samples {
            let _ = writeln!(out, "local_nix_cache_{name}{labels} {v}");
        }
    };
    metric(
        "peers",
        "gauge",
        "Peers in the beacon's table.",
        &[("", st["peers"].as_array().map_or(0, Vec::len) as u64)],
    );
    metric(
        "narinfo_total",
        "counter",
        "Narinfo requests answered, by result.",
        &[
            ("{result=\"peer\"}", u(s, "narinfo_hits_peer")),
            ("{result=\"upstream\"}", u(s, "narinfo_hits_upstream")),
            ("{result=\"miss\"}", u(s, "narinfo_misses")),
        ],
    );
    metric(
        "nars_total",
        "counter",
        "NARs delivered after verification, by source; unavailable ones.",
        &[
            ("{source=\"peer\"}", u(s, "nars_from_peers")),
            ("{source=\"upstream\"}", u(s, "nars_from_upstream")),
            ("{source=\"none\"}", u(s, "nar_failures")),
        ],
    );
    metric(
        "nar_bytes_total",
        "counter",
        "NAR bytes fetched, by source.",
        &[
            ("{source=\"peer\"}", u(s, "bytes_from_peers")),
            ("{source=\"upstream\"}", u(s, "bytes_from_upstream")),
        ],
    );
    metric(
        "lies_total",
        "counter",
        "Answers rejected as false (signature, path, hash).",
        &[("", u(s, "lies"))],
    );
    let keys = [
        "received",
        "announces",
        "queries",
        "goodbyes",
        "too_short",
        "invalid",
        "wrong_version",
        "own",
        "rate_limited",
        "table_full",
        "expired",
    ];
    let labels: Vec<String> = keys.iter().map(|k| format!("{{kind=\"{k}\"}}")).collect();
    let samples: Vec<(&str, u64)> = labels.iter().zip(keys).map(|(l, k)| (l.as_str(), u(b, k))).collect();
    metric(
        "beacon_datagrams_total",
        "counter",
        "Beacon datagrams, by what became of them.",
        &samples,
    );
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
    #[error("{url} did not answer JSON: {message}")]
    Json { url: String, message: String },
}

/// `local-nix-cache status`: fetches the proxy's summary and prints it.
pub async fn print(args: &crate::cli::StatusArgs) -> Result<(), StatusError> {
    let url = format!("{}/status.json", args.proxy.trim_end_matches('/'));
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
    let st: Value = serde_json::from_slice(&body).map_err(|e| StatusError::Json {
        url,
        message: e.to_string(),
    })?;
    if args.json {
        println!("{st}");
    } else {
        print!("{}", text(&st));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        serde_json::json!({
            "peers": [{"addr": "10.0.0.2:8380", "hostname": "<script>alert(1)</script>",
                       "health": {"successes": 3, "failures": 1, "latency_ms": 1.5}, "backed_off": false}],
            "stats": {"narinfo_hits_peer": 5, "narinfo_hits_upstream": 2, "narinfo_misses": 1,
                      "nars_from_peers": 4, "nars_from_upstream": 1, "bytes_from_peers": 3145728,
                      "bytes_from_upstream": 1024, "nar_failures": 0, "lies": 2},
            "beacon": {"received": 10, "announces": 8},
            "recent": [{"path": "/nix/store/x-hello", "source": "peer 10.0.0.2", "bytes": 1024, "ms": 3, "verdict": "verified"}],
        })
    }

    #[test]
    fn page_escapes_what_peers_announce() {
        let h = html(&sample());
        assert!(!h.contains("<script>"), "{h}");
        assert!(h.contains("&lt;script&gt;"));
        assert!(h.contains("3.0 MiB saved"));
        assert!(h.contains("/nix/store/x-hello"));
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let m = metrics(&sample());
        assert!(m.contains("# TYPE local_nix_cache_narinfo_total counter"));
        assert!(m.contains("local_nix_cache_narinfo_total{result=\"peer\"} 5"));
        assert!(m.contains("local_nix_cache_peers 1"));
        assert!(m.contains("local_nix_cache_beacon_datagrams_total{kind=\"announces\"} 8"));
        for line in m.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').expect("sample line");
            assert!(name.starts_with("local_nix_cache_"), "{line}");
            assert!(value.parse::<u64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn terminal_summary() {
        let t = text(&sample());
        assert!(t.contains("peers: 1"));
        assert!(t.contains("NARs: 4 from peers (3.0 MiB)"));
        assert!(t.contains("verified /nix/store/x-hello"));
    }
}
