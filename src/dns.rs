//! Host-name lookups without the C library's resolver.
//!
//! The release binary is linked statically so that it runs on any Linux (NixOS has no
//! `/lib64/ld-linux-x86-64.so.2`). Statically linked glibc cannot load NSS modules, so
//! `getaddrinfo` (and `tokio::net::lookup_host`, which calls it) is not used anywhere: names go to
//! the nameservers of `/etc/resolv.conf` and to `/etc/hosts` through hickory's pure-Rust resolver.
//! Invariant: without a readable `/etc/resolv.conf` a lookup fails with an error that says so; it
//! never falls back to a public resolver (no traffic to addresses the host did not configure).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hickory_resolver::config::{ResolveHosts, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::{ResolveError, TokioResolver};
use tokio::sync::OnceCell;

/// The system's resolver configuration.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// Most answers the resolver keeps cached (entries, each a name and its addresses: a few KiB in
/// all).
pub const DNS_CACHE_ENTRIES: usize = 64;
/// Time one query to one nameserver may take.
pub const DNS_QUERY_TIMEOUT: Duration = Duration::from_secs(3);
/// Tries per nameserver.
pub const DNS_ATTEMPTS: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot read the resolver configuration {path}")]
    Config {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the resolver configuration {path} is invalid")]
    ConfigParse {
        path: PathBuf,
        #[source]
        source: ResolveError,
    },
    #[error("looking up {name}")]
    Lookup {
        name: String,
        #[source]
        source: ResolveError,
    },
}

/// A resolver built on first use from a resolv.conf file (so a machine without one only fails the
/// lookups that need it), then kept with its bounded cache.
pub struct SystemResolver {
    /// Where the nameservers are configured: `/etc/resolv.conf` but for tests.
    conf: PathBuf,
    /// Built at the first lookup, with the runtime that runs it.
    resolver: OnceCell<TokioResolver>,
}

impl Default for SystemResolver {
    fn default() -> Self {
        Self::with_conf(RESOLV_CONF)
    }
}

impl SystemResolver {
    pub fn with_conf(conf: impl AsRef<Path>) -> Self {
        Self {
            conf: conf.as_ref().to_path_buf(),
            resolver: OnceCell::new(),
        }
    }

    /// Every address of `name` (port 0), from `/etc/hosts` or the configured nameservers.
    pub async fn lookup(&self, name: &str) -> Result<Vec<SocketAddr>, DnsError> {
        if let Ok(ip) = name.trim_start_matches('[').trim_end_matches(']').parse() {
            return Ok(vec![SocketAddr::new(ip, 0)]);
        }
        let resolver = self.resolver.get_or_try_init(|| async { self.build() }).await?;
        let ips = resolver.lookup_ip(name).await.map_err(|source| DnsError::Lookup {
            name: name.to_owned(),
            source,
        })?;
        Ok(ips.iter().map(|ip| SocketAddr::new(ip, 0)).collect())
    }

    fn build(&self) -> Result<TokioResolver, DnsError> {
        let text = std::fs::read(&self.conf).map_err(|source| DnsError::Config {
            path: self.conf.clone(),
            source,
        })?;
        let (config, mut opts): (_, ResolverOpts) =
            hickory_resolver::system_conf::parse_resolv_conf(text).map_err(|source| DnsError::ConfigParse {
                path: self.conf.clone(),
                source,
            })?;
        opts.cache_size = DNS_CACHE_ENTRIES;
        opts.timeout = DNS_QUERY_TIMEOUT;
        opts.attempts = DNS_ATTEMPTS;
        opts.use_hosts_file = ResolveHosts::Always;
        Ok(
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
                .with_options(opts)
                .build(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    /// A one-answer DNS server on loopback: answers every A question with `answer`, counts queries.
    async fn fake_nameserver(answer: Ipv4Addr) -> (SocketAddr, tokio::task::JoinHandle<usize>) {
        use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
        use hickory_resolver::proto::rr::{rdata::A, RData, Record, RecordType};
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
        let addr = sock.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let mut served = 0;
            while let Ok(Ok((n, from))) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await {
                let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
                let mut r = Message::new();
                r.set_id(q.id())
                    .set_message_type(MessageType::Response)
                    .set_response_code(ResponseCode::NoError)
                    .set_recursion_available(true)
                    .add_queries(q.queries().to_vec());
                for query in q.queries() {
                    if query.query_type() == RecordType::A {
                        r.add_answer(Record::from_rdata(query.name().clone(), 60, RData::A(A(answer))));
                    }
                }
                served += 1;
                let _ = sock.send_to(&r.to_vec().expect("encode"), from).await;
            }
            served
        });
        (addr, task)
    }

    #[tokio::test]
    async fn names_go_to_the_resolv_conf_nameserver() {
        let want = Ipv4Addr::new(10, 83, 80, 7);
        let (ns, server) = fake_nameserver(want).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("resolv.conf");
        std::fs::write(&conf, format!("nameserver {}\noptions ndots:1\n", ns.ip())).expect("write");
        // hickory's resolv.conf has no port syntax: point the config at the fake server's port.
        let r = SystemResolver::with_conf(&conf);
        let resolver = r.build().expect("build");
        let mut config = resolver.config().clone();
        let servers: Vec<_> = config
            .name_servers()
            .iter()
            .map(|s| {
                let mut s = s.clone();
                s.socket_addr = ns;
                s
            })
            .collect();
        config = hickory_resolver::config::ResolverConfig::from_parts(None, vec![], servers);
        let mut opts = resolver.options().clone();
        opts.use_hosts_file = ResolveHosts::Never;
        let r = SystemResolver {
            conf,
            resolver: OnceCell::new_with(Some(
                TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
                    .with_options(opts)
                    .build(),
            )),
        };
        let got = r.lookup("cache.example.test").await.expect("lookup");
        assert!(got.contains(&SocketAddr::new(IpAddr::V4(want), 0)), "{got:?}");
        drop(r);
        assert!(server.await.expect("server") >= 1, "the fake nameserver was asked");
    }

    #[tokio::test]
    async fn a_missing_resolv_conf_fails_the_lookup_and_says_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = SystemResolver::with_conf(dir.path().join("resolv.conf"));
        let err = r.lookup("cache.nixos.org").await.expect_err("no config, no lookup");
        assert!(matches!(err, DnsError::Config { .. }), "{err:?}");
        // IP literals need no resolver at all.
        let ip = r.lookup("[::1]").await.expect("literal");
        assert_eq!(ip, vec!["[::1]:0".parse::<SocketAddr>().expect("addr")]);
    }
}
