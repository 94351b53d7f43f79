//! The layout rules of `docs/ARCHITECTURE.md`, checked on the source tree itself:
//! no import cycle between the files of `src/` (nor between its top-level modules), no source
//! file over `MAX_FILE_LINES`, and no detached `tokio::spawn` outside the places that own tasks.
//!
//! A "use" is any path a file names outside its comments and its `#[cfg(test)]` items:
//! `crate::a::b`, `super::x`, `self::x`, a child module's `child::x`, and every leaf of a
//! `use a::{b, c::d}` group. A path resolves to the longest module it names (an item of
//! `proxy/mod.rs` named as `crate::proxy::Proxy` is a use of `proxy`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest a source file may be (test-only files excepted).
const MAX_FILE_LINES: usize = 600;

/// One source file of the library: its module path and its code without comments or tests.
struct SourceFile {
    module: Vec<String>,
    path: PathBuf,
    lines: usize,
    code: String,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("src/ is readable")
        .map(|e| e.expect("src/ entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rs_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Test-only files (`#[cfg(test)] #[path = "x_tests.rs"]` or `tests.rs`) and the binary.
fn is_library_file(rel: &Path) -> bool {
    let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !(name.ends_with("_tests.rs") || name == "tests.rs" || rel == Path::new("main.rs"))
}

fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
        parts.pop();
    }
    parts
}

/// The file without comments and without its `#[cfg(test)]` items (a `mod x;` line or a
/// `mod x { … }` block closed by a `}` at column 0).
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.starts_with("#[cfg(test)]") {
            for item in lines.by_ref() {
                if item.starts_with("#[") {
                    continue;
                }
                if !item.trim_end().ends_with(';') {
                    for rest in lines.by_ref() {
                        if rest == "}" {
                            break;
                        }
                    }
                }
                break;
            }
            continue;
        }
        let code = match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    out
}

fn load() -> Vec<SourceFile> {
    let root = src_dir();
    let mut paths = Vec::new();
    rs_files(&root, &mut paths);
    paths
        .into_iter()
        .filter_map(|path| {
            let rel = path.strip_prefix(&root).expect("under src/").to_path_buf();
            if !is_library_file(&rel) {
                return None;
            }
            let text = std::fs::read_to_string(&path).expect("source file is UTF-8");
            Some(SourceFile {
                module: module_of(&rel),
                lines: text.lines().count(),
                code: code_of(&text),
                path: rel,
            })
        })
        .collect()
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Reads a path (or a `use` tree) starting at `s`, pushing every full path it names.
fn read_tree(s: &str, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let mut i = 0;
    let mut path = prefix.to_vec();
    let b = s.as_bytes();
    loop {
        while i < b.len() && (b[i] as char).is_whitespace() {
            i += 1;
        }
        if i < b.len() && b[i] == b'{' {
            i += 1;
            loop {
                i += read_tree(&s[i..], &path, out);
                while i < b.len() && (b[i] as char).is_whitespace() {
                    i += 1;
                }
                match b.get(i) {
                    Some(b',') => i += 1,
                    Some(b'}') => return i + 1,
                    _ => return i,
                }
                while i < b.len() && (b[i] as char).is_whitespace() {
                    i += 1;
                }
                if b.get(i) == Some(&b'}') {
                    return i + 1;
                }
            }
        }
        let start = i;
        while i < b.len() && is_ident_char(b[i] as char) {
            i += 1;
        }
        if i > start {
            path.push(s[start..i].to_string());
        } else if b.get(i) == Some(&b'*') {
            i += 1;
        }
        if s[i..].starts_with("::") {
            i += 2;
            continue;
        }
        out.push(path);
        return i;
    }
}

/// The inline modules of `code` (`mod name { … }`): where each one's body starts and ends.
fn inline_modules(code: &str) -> Vec<(usize, usize, String)> {
    let b = code.as_bytes();
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(i) = code[from..].find("mod ").map(|i| i + from) {
        from = i + 4;
        if i > 0 && is_ident_char(b[i - 1] as char) {
            continue;
        }
        let rest = &code[i + 4..];
        let name: String = rest.chars().take_while(|c| is_ident_char(*c)).collect();
        let after = rest[name.len()..].trim_start();
        if name.is_empty() || !after.starts_with('{') {
            continue;
        }
        let open = code.len() - after.len();
        let mut depth = 0usize;
        let mut end = code.len();
        for (j, c) in code[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + j;
                        break;
                    }
                }
                _ => {}
            }
        }
        found.push((open, end, name));
    }
    found
}

/// Every path of `code` that starts at `crate`, `super`, `self` or a child module's name,
/// resolved from the crate root (`super` inside an inline `mod x { … }` is the file's module).
fn paths_in(code: &str, file_module: &[String], children: &BTreeSet<String>) -> Vec<Vec<String>> {
    let inline = inline_modules(code);
    let mut out = Vec::new();
    let b = code.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        if !is_ident_char(c) || (i > 0 && (is_ident_char(b[i - 1] as char) || code[..i].ends_with("::"))) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && is_ident_char(b[i] as char) {
            i += 1;
        }
        let word = &code[start..i];
        if !code[i..].starts_with("::") {
            continue;
        }
        let mut module = file_module.to_vec();
        module.extend(
            inline
                .iter()
                .filter(|(a, z, _)| (*a..*z).contains(&start))
                .map(|(_, _, n)| n.clone()),
        );
        let mut found = Vec::new();
        let used = read_tree(&code[start..], &[], &mut found);
        for raw in found {
            let mut base: Vec<String> = match raw.first().map(String::as_str) {
                Some("crate") => Vec::new(),
                Some("self") | Some("super") => module.clone(),
                Some(w) if children.contains(w) && module.len() == file_module.len() => module.clone(),
                _ => continue,
            };
            let mut rest = raw.as_slice();
            if rest.first().is_some_and(|w| w == "crate" || w == "self") {
                rest = &rest[1..];
            }
            while rest.first().is_some_and(|w| w == "super") {
                base.pop();
                rest = &rest[1..];
            }
            base.extend(rest.iter().filter(|w| w.as_str() != "self").cloned());
            out.push(base);
        }
        let _ = word;
        i = start + used.max(1);
    }
    out
}

/// The module each file uses (excluding itself and the crate root), by file.
fn graph(files: &[SourceFile]) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| f.module.clone()).collect();
    let mut edges = BTreeMap::new();
    for f in files {
        let children: BTreeSet<String> = modules
            .iter()
            .filter(|m| m.len() == f.module.len() + 1 && m.starts_with(&f.module))
            .map(|m| m[m.len() - 1].clone())
            .collect();
        let mut to = BTreeSet::new();
        for path in paths_in(&f.code, &f.module, &children) {
            let target = (0..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|p| modules.contains(p));
            if let Some(t) = target {
                if !t.is_empty() && t != f.module {
                    to.insert(t);
                }
            }
        }
        edges.insert(f.module.clone(), to);
    }
    edges
}

/// Strongly connected components with more than one member (Tarjan).
fn cycles(edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<String>> {
    struct State<'a> {
        edges: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<&'a Vec<String>, (usize, usize)>,
        stack: Vec<&'a Vec<String>>,
        on_stack: BTreeSet<&'a Vec<String>>,
        next: usize,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Vec<String>) {
        s.index.insert(v, (s.next, s.next));
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.edges.get(v).into_iter().flatten() {
            let Some((w_key, _)) = s.edges.get_key_value(w) else {
                continue;
            };
            if !s.index.contains_key(w_key) {
                visit(s, w_key);
                let low = s.index[w_key].1.min(s.index[v].1);
                s.index.get_mut(v).expect("visited").1 = low;
            } else if s.on_stack.contains(w_key) {
                let low = s.index[w_key].0.min(s.index[v].1);
                s.index.get_mut(v).expect("visited").1 = low;
            }
        }
        if s.index[v].0 == s.index[v].1 {
            let mut scc = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                scc.push(w.join("::"));
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                s.found.push(scc);
            }
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.found
}

#[test]
fn no_import_cycle_between_files() {
    let found = cycles(&graph(&load()));
    assert!(
        found.is_empty(),
        "files that import each other (directly or around a loop): {found:#?}"
    );
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let mut top: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (from, to) in graph(&load()).into_iter().filter(|(from, _)| !from.is_empty()) {
        let entry = top.entry(from[..1].to_vec()).or_default();
        entry.extend(to.into_iter().map(|t| t[..1].to_vec()).filter(|t| t[..] != from[..1]));
    }
    let found = cycles(&top);
    assert!(found.is_empty(), "top-level modules that import each other: {found:#?}");
}

#[test]
fn no_source_file_over_the_limit() {
    let long: Vec<String> = load()
        .iter()
        .filter(|f| f.lines > MAX_FILE_LINES)
        .map(|f| format!("src/{} ({} lines)", f.path.display(), f.lines))
        .collect();
    assert!(long.is_empty(), "source files over {MAX_FILE_LINES} lines: {long:?}");
}

#[test]
fn every_spawned_task_has_an_owner() {
    // A bare `tokio::spawn` returns a handle that detaches the task when dropped; the library
    // spawns into a `JoinSet` or a tracker owned by a part instead.
    let detached: Vec<String> = load()
        .iter()
        .filter(|f| f.code.contains("tokio::spawn(") || f.code.contains("task::spawn("))
        .map(|f| format!("src/{}", f.path.display()))
        .collect();
    assert!(detached.is_empty(), "files with a detached tokio::spawn: {detached:?}");
}

#[test]
fn the_checker_sees_a_planted_cycle() {
    let file = |m: &str, code: &str| SourceFile {
        module: m.split("::").map(String::from).collect(),
        path: PathBuf::from(m),
        lines: 1,
        code: code_of(code),
    };
    let files = [
        file("a", "mod b;\nuse b::{Thing, other::X};\n"),
        file("a::b", "use super::Parent;\n// use crate::c::Nothing;\n"),
        file("a::other", "pub struct X;\nuse deeper::Y;\n"),
        file(
            "c",
            "fn f() { crate::a::other::X; }\n#[cfg(test)]\nmod tests {\n    use crate::a::Y;\n}\n",
        ),
        file("a::other::deeper", "mod inline {\n    use super::Sibling;\n}\n"),
    ];
    let edges = graph(&files);
    assert_eq!(cycles(&edges), vec![vec!["a".to_string(), "a::b".to_string()]]);
    let c_uses: Vec<_> = edges[&vec!["c".to_string()]].iter().map(|m| m.join("::")).collect();
    assert_eq!(
        c_uses,
        ["a::other"],
        "tests and comments are not uses; the longest module wins"
    );
}

/// A count as the docs write it: `4,096`.
fn count(n: impl Into<u64>) -> String {
    let digits = n.into().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Seconds as the docs write them: `5 s`, `0.5 s`.
fn secs(d: std::time::Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

fn kib(bytes: impl Into<u64>) -> String {
    let b = bytes.into();
    assert_eq!(b % 1024, 0, "{b} is not whole KiB");
    format!("{} KiB", b / 1024)
}

fn mib(bytes: impl Into<u64>) -> String {
    let b = bytes.into();
    assert_eq!(b % (1024 * 1024), 0, "{b} is not whole MiB");
    format!("{} MiB", b / (1024 * 1024))
}

/// Every figure docs/ARCHITECTURE.md quotes from the code, in one place: each phrase is built
/// from the constant, so changing a constant without the doc (or the doc without the code)
/// fails here. Whitespace is normalised, so the doc may wrap lines anywhere.
#[test]
fn the_architecture_doc_quotes_the_constants() {
    use crate::{beacon, cache_url, http, proxy, server, store, summary};
    let doc = include_str!("../docs/ARCHITECTURE.md")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let u = |n: usize| n as u64;
    let peer = proxy::source::PEER_TIMEOUTS;
    let up = proxy::source::UPSTREAM_TIMEOUTS;
    assert_eq!(
        proxy::health::MAX_TRACKED_PEERS,
        proxy::forms::MAX_TRACKED_PEERS,
        "quoted as one figure"
    );
    assert_eq!(
        proxy::proven::MAX_BANNED_NODES,
        proxy::proven::MAX_BANNED_ADDRS,
        "quoted as one figure"
    );
    let phrases = [
        // Invariants.
        format!(
            "the table holds at most {} peers ({} per source address), {} rate-limit buckets (LRU), {} pending proofs and {} asked addresses (LRU)",
            count(u(beacon::table::MAX_PEERS)),
            beacon::table::MAX_PEERS_PER_ADDR,
            count(u(beacon::table::MAX_SOURCES)),
            beacon::table::contest::MAX_PENDING,
            count(u(beacon::table::contest::MAX_ASKED)),
        ),
        format!(
            "{} in flight, {} waiting, {} addresses remembered",
            beacon::prover::ASK_AT_ONCE,
            beacon::table::contest::MAX_PENDING,
            count(u(beacon::table::contest::MAX_ASKED)),
        ),
        format!("`passthrough::TAIL` ({})", kib(proxy::passthrough::TAIL)),
        format!(
            "(`server::misses`: a queue of {}, each hash once per {}, {} checks/s)",
            server::misses::QUEUE,
            secs(server::misses::RECHECK_AFTER),
            server::misses::CHECKS_PER_SEC,
        ),
        format!(
            "the store server's channel to the client holds at most {} chunks ({} from the daemon, {} from disk)",
            server::NAR_CHANNEL_CHUNKS,
            kib(u(store::daemon::READ_BUF)),
            kib(u(store::dump::CHUNK)),
        ),
        // The beacon.
        format!(
            "`ANNOUNCE_BUDGET_BYTES_PER_SEC`, {} KB/s",
            beacon::ANNOUNCE_BUDGET_BYTES_PER_SEC / 1000
        ),
        format!(
            "`RESCAN_INTERVAL`, {}, as a safety net; {} without netlink",
            secs(beacon::RESCAN_INTERVAL),
            secs(beacon::RESCAN_INTERVAL_NO_NETLINK)
        ),
        format!("`WAKE_GRACE` ({})", secs(beacon::WAKE_GRACE)),
        format!(
            "Seeds: at most {}, each asked every {} ({} once the table holds {} peers), a failure retried after {} doubling up to {}; {} entries per list, probed {} at a time, each within {}.",
            beacon::seeds::MAX_SEEDS,
            secs(beacon::seeds::SEED_REFRESH),
            secs(beacon::seeds::SEED_REFRESH_LARGE),
            beacon::seeds::SMALL_HALL,
            secs(beacon::seeds::SEED_RETRY_FIRST),
            secs(beacon::seeds::SEED_RETRY_MAX),
            beacon::seeds::MAX_SEED_ENTRIES,
            beacon::seeds::PROBES_AT_ONCE,
            secs(beacon::seeds::PROBE_TIMEOUT),
        ),
        format!("`QUERY_ANSWERS` ({})", beacon::QUERY_ANSWERS),
        format!("`LOOK_SAFETY` ({})", secs(beacon::wake::LOOK_SAFETY)),
        format!(
            "drained every `READ_EVERY` ({}, at most {} of the announce interval), at most {} datagrams a socket per drain",
            secs(beacon::READ_EVERY),
            beacon::READ_EVERY_INTERVALS,
            beacon::MAX_DRAIN,
        ),
        format!("{} of receive buffer asked per socket", kib(u(beacon::RCVBUF_BYTES))),
        format!("every `CHECK_SAFETY` ({}) otherwise", secs(proxy::summaries::CHECK_SAFETY)),
        // Shutdown, backpressure and bounds.
        format!("`DRAIN_TIMEOUT` ({})", secs(http::DRAIN_TIMEOUT)),
        format!(
            "at most {} and half of the open-file limit left after a reserve of {}, {} per address",
            count(u(server::MAX_CONNECTIONS)),
            server::limits::FD_RESERVE,
            server::limits::MAX_CONNECTIONS_PER_ADDR,
        ),
        format!("at most {})", kib(u(http::MAX_READ_BUF))),
        format!(
            "(`httparse`, at most {} and {} headers, within the header timeout)",
            kib(u(http::raw::MAX_RAW_HEAD)),
            http::raw::MAX_RAW_HEADERS
        ),
        format!(
            "the NAR's framing and references to its files, at most {}, for",
            mib(u(store::dump::MAX_PLAN_BYTES))
        ),
        format!("NAR streams leave {} to queries", store::QUERY_RESERVE),
        format!(
            "transfers ({}, {} per address, {} fair queue; a proxy's request waits {} and is then answered busy, `Retry-After` {}; one NAR streams to at most {} copies at once, a split fetch's segment counting by its length, the next is answered busy at once naming the hosts fetching it whole, at most {}; NARs of {} or less are not shared so)",
            server::transfers::MAX_TRANSFERS,
            server::transfers::MAX_TRANSFERS_PER_ADDR,
            secs(server::transfers::QUEUE_WAIT),
            secs(server::transfers::BUSY_WAIT),
            secs(server::transfers::BUSY_RETRY_AFTER),
            server::transfers::MAX_TRANSFERS_PER_NAR,
            cache_url::MAX_TRY_HINTS,
            mib(server::transfers::SHARED_NAR_MIN_BYTES),
        ),
        format!(
            "NARs offered to peers while they arrive ({}, `MAX_PARTIALS`; each a narinfo and a handle on its spool file; a reader reads {} at a time and waits at most {} for more)",
            proxy::partial::MAX_PARTIALS,
            kib(u(proxy::tail::TAIL_CHUNK)),
            secs(server::partial::PARTIAL_IDLE),
        ),
        format!(
            "busy peers asked again for at most {} (`BUSY_WAIT_CAP`), their `Retry-After` taken within {} and {}",
            secs(proxy::busy::BUSY_WAIT_CAP),
            secs(proxy::source::BUSY_RETRY_BOUNDS.0),
            secs(proxy::source::BUSY_RETRY_BOUNDS.1),
        ),
        format!("per-stream channel ({} chunks, `NAR_CHANNEL_CHUNKS`)", server::NAR_CHANNEL_CHUNKS),
        format!("request path length ({})", cache_url::MAX_PATH_LEN),
        format!(
            "header read timeout (proxy {}, store server {},",
            secs(http::HEADER_READ_TIMEOUT),
            secs(server::limits::HEADER_TIMEOUT)
        ),
        format!("pace ({} per {})", kib(http::PACE_WINDOW_BYTES), secs(http::PACE_WINDOW)),
        format!("per-operation daemon deadline ({})", secs(store::OP_TIMEOUT)),
        format!(
            "a NAR copy's read buffers ({} of {} kept for reuse; {} of {} for a copy feeding a pass-through of {} or more)",
            proxy::READS.keep,
            kib(u(proxy::READS.chunk)),
            proxy::PASS_READS.keep,
            mib(u(proxy::PASS_READS.chunk)),
            mib(proxy::PASS_READS_MIN_BYTES)
        ),
        format!(
            "pass-through channels ({} read chunks of {} per tap ({} from {}), pulled by the connection; a body that takes nothing for {} detaches its tap)",
            proxy::passthrough::PASS_CHUNKS,
            kib(u(proxy::READS.chunk)),
            mib(u(proxy::PASS_READS.chunk)),
            mib(proxy::PASS_READS_MIN_BYTES),
            secs(proxy::passthrough::PASS_STALL),
        ),
        format!(
            "proven peers ({} pairs, {} banned node ids and addresses, a state file of at most {})",
            count(u(proxy::proven::MAX_PROVEN)),
            count(u(proxy::proven::MAX_BANNED_NODES)),
            mib(proxy::proven::MAX_FILE_BYTES),
        ),
        format!(
            "proxy fan-out ({} \"maybe\" peers + {} unknown with summaries, {} unknown when none says \"maybe\", {} without)",
            proxy::book::MAYBE_FANOUT,
            proxy::book::UNKNOWN_SAMPLE,
            proxy::book::MAX_FANOUT,
            proxy::book::MAX_FANOUT,
        ),
        format!(
            "summaries ({} in all, {} each)",
            mib(u(proxy::summaries::MAX_TOTAL_BYTES)),
            mib(u(summary::MAX_SUMMARY_BYTES))
        ),
        format!(
            "narinfo caches (positive: {} entries and {} of narinfo, LRU; negative: {} entries, {})",
            count(u(proxy::cache::MAX_KNOWN_ENTRIES)),
            mib(u(proxy::cache::MAX_KNOWN_BYTES)),
            count(u(proxy::cache::MAX_MISSING_ENTRIES)),
            secs(proxy::cache::NEGATIVE_TTL),
        ),
        format!(
            "source health and form samples ({} peers each, LRU)",
            count(u(proxy::health::MAX_TRACKED_PEERS))
        ),
        format!(
            "per-source timeouts (peers: connect {}, narinfo {}, idle {}; upstreams: {}, {}, {})",
            secs(peer.connect),
            secs(peer.narinfo),
            secs(peer.idle),
            secs(up.connect),
            secs(up.narinfo),
            secs(up.idle),
        ),
        format!("an unreachable upstream is skipped for {}", secs(proxy::health::UPSTREAM_DOWN_FOR)),
    ];
    let missing: Vec<&String> = phrases.iter().filter(|p| !doc.contains(p.as_str())).collect();
    assert!(missing.is_empty(), "docs/ARCHITECTURE.md should say: {missing:#?}");
}
